"""Pixtral-12B (llava + pixtral tower) and Mistral 3 through the family seam: the whole model against
transformers.

Tiny random checkpoints saved by save_pretrained (tests/tiny.py); the prompt ids and pixel tensors come from
transformers' own PixtralProcessor (over PixtralImageProcessorPil) and the logits from
LlavaForConditionalGeneration / Mistral3ForConditionalGeneration, in float32.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import foveal
from foveal.errors import ConfigError
from foveal.models import registry
from tiny import build_pixtral, hf_pixtral, hf_pixtral_processor
from tiny import ask as _ask, random_image as _image

KINDS = ("llava", "mistral3")
# (width, height): tall and wide (both shrunk to the 96-px longest edge), small (grown to whole patches)
SIZES = {"tall": (50, 300), "wide": (333, 57), "small": (13, 21)}


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    folder = build_pixtral(tmp_path_factory.mktemp(request.param), kind=request.param)
    return request.param, folder, foveal.load(str(folder), dtype="float32"), hf_pixtral(folder), \
        hf_pixtral_processor(folder)


def _hf_inputs(processor, messages, images):
    parts = [[{"type": "image"} if p["type"] == "image" else p for p in m["content"]]
             if isinstance(m["content"], list) else m["content"] for m in messages]
    hf_messages = [{"role": m["role"], "content": c} for m, c in zip(messages, parts)]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    # the template writes <s> itself: apply_chat_template(tokenize=True) then adds no second one, nor do we
    return processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=False)


def _logits(hf, inputs):
    with torch.no_grad():
        return hf(**inputs).logits[0]


def test_registry_routes_pixtral_by_its_vision_model_type(pair):
    kind, folder, ours, _, _ = pair
    raw = json.loads((folder / "config.json").read_text())
    assert registry.family_name(raw) == "pixtral"
    clip_llava = dict(raw, vision_config={"model_type": "clip_vision_model"})
    assert registry.family_name(clip_llava) == ("llava" if kind == "llava" else "pixtral")
    assert ours.describe()["family"] == "pixtral" and ours.describe()["layout"] == kind


@pytest.mark.parametrize("shape", list(SIZES))
def test_prompt_logits_and_inputs_match_transformers(pair, shape):
    kind, _, ours, hf, processor = pair
    image = _image(SIZES[shape])
    messages = _ask("What is in this image?", image)
    ref_inputs = _hf_inputs(processor, messages, [image])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    pixels, sizes = ours.processor.pixels(ours.processor.prepare(messages, ours.image_limits).images)
    assert torch.equal(sizes, ref_inputs["image_sizes"])
    assert torch.equal(pixels, ref_inputs["pixel_values"])
    assert (logits - _logits(hf, ref_inputs)).abs().max().item() <= 1e-4
    assert ours.count_tokens(messages) == len(ids)
    # the image matters: another one changes the logits
    other = ours.prompt_logits(_ask("What is in this image?", _image(SIZES[shape], seed=9)))[1]
    assert (other - logits).abs().max().item() > 1e-3


def test_image_token_rows(pair):
    kind, _, ours, _, processor = pair
    tok = processor.tokenizer
    ids = ours.prompt_logits(_ask("hi", _image(SIZES["tall"])))[0]
    tokens = tok.convert_ids_to_tokens(ids)
    block = tokens[tokens.index("[IMG]"):tokens.index("[IMG_END]") + 1]
    rows = "".join(block).split("[IMG_BREAK]")
    merge = 1 if kind == "llava" else 2
    height, width = 96, 16        # 50x300 fitted into 96 px: 16x96, in whole 8-px (merged: 16-px) patches
    assert len(rows) == height // (8 * merge)
    assert all(r.replace("[IMG_END]", "") == "[IMG]" * (width // (8 * merge)) for r in rows)
    assert ours.image_tokens((300, 50)) == (height // (8 * merge)) * (width // (8 * merge))


def test_two_images_and_a_multi_turn_chat(pair):
    kind, _, ours, hf, processor = pair
    a, b, c = _image(SIZES["wide"], 1), _image(SIZES["tall"], 2), _image(SIZES["small"], 3)
    messages = [{"role": "system", "content": "You answer briefly."},
                *_ask("Compare these.", a, b),
                {"role": "assistant", "content": "The first is wider."},
                *_ask("And this one?", c)]
    ref_inputs = _hf_inputs(processor, messages, [a, b, c])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    pixels, sizes = ours.processor.pixels(ours.processor.prepare(messages, ours.image_limits).images)
    assert torch.equal(sizes, ref_inputs["image_sizes"]) and torch.equal(pixels, ref_inputs["pixel_values"])
    assert (logits - _logits(hf, ref_inputs)).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers_for_32_tokens(pair):
    kind, _, ours, hf, processor = pair
    image = _image((120, 80), 4)
    messages = _ask("Describe it.", image)
    ref_inputs = _hf_inputs(processor, messages, [image])
    with torch.no_grad():
        ref = hf.generate(**ref_inputs, max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, ref_inputs["input_ids"].shape[1]:]
    ours.engine.eos_ids, eos = set(), ours.engine.eos_ids
    try:
        r = ours.generate(messages, max_tokens=32, temperature=0.0)
        again = ours.generate(messages, max_tokens=32, temperature=0.0)     # prefix and image from the caches
    finally:
        ours.engine.eos_ids = eos
    assert r.token_ids == ref.tolist()
    assert again.token_ids == r.token_ids and again.stats.cached_tokens > 0
    assert r.stats.images == 1 and r.stats.image_tokens == ref_inputs["input_ids"][0].eq(
        ours.config.image_token_id).sum().item()


def test_text_only_prompt_matches_transformers(pair):
    _, _, ours, hf, processor = pair
    messages = [{"role": "user", "content": "hello world"}]
    ref_inputs = _hf_inputs(processor, messages, [])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    assert (logits - _logits(hf, ref_inputs)).abs().max().item() <= 1e-4


# ---- bad configs: each refused by name ---------------------------------------------------------
def _edited(folder, tmp_path, edit, file="config.json"):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    d = json.loads((out / file).read_text())
    edit(d)
    (out / file).write_text(json.dumps(d))
    return out


def test_processor_that_disagrees_with_the_tower_is_refused(pair, tmp_path):
    _, folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d.update(patch_size=16), file="processor_config.json")
    with pytest.raises(ConfigError, match="processor_config.json cuts 16-px patches.*8-px patches"):
        foveal.load(str(bad))


def test_image_token_that_is_not_the_tokenizers_is_refused(pair, tmp_path):
    _, folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d.update(image_token_index=7))
    with pytest.raises(ConfigError, match=r"image_token_index 7 is not the tokenizer's \[IMG\]"):
        foveal.load(str(bad))


def test_bad_vision_config_is_refused_by_key(pair, tmp_path):
    _, folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d.update(vision_feature_layer=9))
    with pytest.raises(ConfigError, match="vision_feature_layer 9: the tower has 4 hidden states"):
        foveal.load(str(bad))
    shutil.rmtree(bad)
    bad = _edited(folder, tmp_path, lambda d: d["vision_config"].update(rope_parameters={"rope_type": "default"}))
    with pytest.raises(foveal.errors.UnsupportedModelError, match="rope_type 'default'.*axial"):
        foveal.load(str(bad))
