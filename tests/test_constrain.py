"""JSON-constrained decoding (`format=`): the output parses and validates whatever the model wants.

A random-weight model writes byte noise when unconstrained, so any JSON that comes out of it is the
constraint's doing: these tests check parse / validate / finish reason over many seeds and
temperatures, on a byte-level vocabulary (the bundled random model) and on a BPE vocabulary with
merges (tiny.build_llava's qwen2 tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch

import foveal
import tiny
from foveal.bundled import build_random_model
from foveal.engine.constrain import JSONConstraint
from foveal.engine.sampling import Sampler, SamplingOptions
from foveal.errors import SamplingError

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

ASK = [{"role": "user", "content": "Describe the image as JSON."}]
SEEDS = range(4)
TEMPERATURES = (0.0, 0.8, 1.5)           # greedy runs once: the seed does not matter there
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "nothing": {"type": "null"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "colour", "ok", "nothing", "score", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return foveal.load(build_random_model(tmp_path_factory.mktemp("constrain") / "tiny"), dtype="float32")


@pytest.fixture(scope="module")
def bpe_vlm(tmp_path_factory):
    return foveal.load(tiny.build_llava(tmp_path_factory.mktemp("constrain-bpe"), text="qwen2"), dtype="float32")


def test_unconstrained_output_is_not_json(vlm):
    """The premise of the other tests: without a constraint this model does not write JSON."""
    for seed in SEEDS:
        text = vlm.generate(ASK, max_tokens=20, temperature=1.0, seed=seed).text
        with pytest.raises(ValueError):
            json.loads(text)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_format_json_always_parses_to_an_object(vlm, temperature):
    outputs = []
    for seed in SEEDS if temperature else [0]:
        r = vlm.generate(ASK, format="json", max_tokens=3000, temperature=temperature, seed=seed)
        assert r.finish_reason == "stop", (seed, r.text[:200])
        assert isinstance(json.loads(r.text), dict), r.text[:200]
        assert vlm.engine.eos_ids.isdisjoint(r.token_ids)
        outputs.append(r.text)
    assert r.stats.generated_tokens == len(r.token_ids)
    if temperature > 0:
        assert len(set(outputs)) > 1          # sampling still varies, within the grammar


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_schema_output_validates(vlm, temperature):
    seen_colours = set()
    for seed in SEEDS if temperature else [0]:
        r = vlm.generate(ASK, format=PERSON, max_tokens=1000, temperature=temperature, seed=seed)
        assert r.finish_reason == "stop", (seed, r.text[:200])
        value = json.loads(r.text)
        jsonschema.validate(value, PERSON)
        seen_colours.add(value["colour"])
    if temperature > 0:
        assert len(seen_colours) > 1


def test_enum_schema_stops_when_the_grammar_is_complete(vlm):
    schema = {"enum": ["cat", "dog", "a red circle"]}
    for seed in SEEDS:
        r = vlm.generate(ASK, format=schema, max_tokens=50, temperature=1.0, seed=seed)
        assert json.loads(r.text) in schema["enum"] and r.finish_reason == "stop"


def test_stream_matches_generate_under_a_schema(vlm):
    full = vlm.generate(ASK, format=PERSON, max_tokens=1000, temperature=0.8, seed=3)
    chunks = list(vlm.stream(ASK, format=PERSON, max_tokens=1000, temperature=0.8, seed=3))
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].done and chunks[-1].finish_reason == "stop"


def test_max_tokens_too_small_gives_length_and_incomplete_json(vlm):
    """As in Ollama and OpenAI: the grammar is cut off, the text may not parse, the reason says so."""
    r = vlm.generate(ASK, format=PERSON, max_tokens=5, temperature=0.8, seed=0)
    assert r.finish_reason == "length" and len(r.token_ids) == 5
    assert r.text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(r.text)


def test_bpe_vocabulary_with_merges(bpe_vlm):
    """Multi-byte tokens (merges such as ' the', 'ed') must only be allowed where all their bytes fit."""
    tok = bpe_vlm.tokenizer
    assert any(len(tok.decode([i])) > 1 for i in range(tok.vocab_size))
    merged_picks = 0
    for temperature, seed in [(0.0, 0), (1.0, 0), (1.0, 1), (1.5, 2)]:
        r = bpe_vlm.generate(ASK, format=PERSON, max_tokens=1000, temperature=temperature, seed=seed)
        assert r.finish_reason == "stop", r.text[:200]
        jsonschema.validate(json.loads(r.text), PERSON)
        assert tok.decode(r.token_ids) == r.text
        merged_picks += sum(len(tok.decode([t])) > 1 for t in r.token_ids)
    assert merged_picks > 0


def test_sampler_mask_only_picks_allowed_tokens():
    logits = torch.randn(50)
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[[3, 17, 40]] = True
    greedy = Sampler(SamplingOptions(temperature=0), 50, "cpu")
    assert greedy(logits, allowed) == max((3, 17, 40), key=lambda i: logits[i])
    sampled = Sampler(SamplingOptions(temperature=2.0, top_k=20, top_p=0.9, min_p=0.01, seed=0), 50, "cpu")
    assert {sampled(logits, allowed) for _ in range(200)} <= {3, 17, 40}


@pytest.mark.parametrize("fmt, needle", [
    ("yaml", 'must be "json" or a json schema'),
    (5, "must be \"json\" or a json schema"),
    ({"type": "foo"}, "invalid type: foo"),
    ({"type": "object", "required": "name"}, "required"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum (5) is greater than maximum (2)"),
    ({"not": {"type": "string"}}, "unimplemented"),
    ({"$ref": "#/$defs/missing"}, "does not exist"),
    ({"type": "string", "pattern": "("}, "regex"),
])
def test_bad_formats_raise_sampling_error_naming_the_problem(vlm, fmt, needle):
    with pytest.raises(SamplingError) as err:
        vlm.generate(ASK, format=fmt, max_tokens=5)
    assert needle in str(err.value).lower()


def test_no_format_is_no_constraint(vlm):
    a = vlm.generate(ASK, max_tokens=12, temperature=0)
    b = vlm.generate(ASK, format="", max_tokens=12, temperature=0)
    c = vlm.generate(ASK, format=None, max_tokens=12, temperature=0)
    assert a.text == b.text == c.text and a.token_ids == b.token_ids


def test_constraint_rejects_a_forbidden_token(vlm):
    constraint = JSONConstraint.build("json", vlm.tokenizer, vlm.config.text.vocab_size, vlm.engine.eos_ids)
    mask = constraint.allowed("cpu")
    assert mask.shape == (vlm.config.text.vocab_size,)
    assert [vlm.tokenizer.decode([i]) for i in mask.nonzero().flatten().tolist()] == ["{"]
    x = vlm.tokenizer.encode("x", add_special_tokens=False)[0]
    with pytest.raises(SamplingError, match="refused"):
        constraint.pick(lambda logits, allowed: x, torch.zeros(mask.shape))      # a sampler that ignores the mask
