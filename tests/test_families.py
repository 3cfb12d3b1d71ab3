"""The family seam: every registered family passes the same checks through the public API, the CLI,
the planner and both servers, with tiny checkpoints saved by transformers. A new family gets them by
adding its builder to BUILDERS."""

from __future__ import annotations

import base64
import io

import ollama
import openai
import pytest
import torch
from PIL import Image

import foveal
from foveal.cli import info_dict, main as cli_main
from foveal.errors import PromptError
from foveal.models import registry
from foveal.plan import plan
from live_server import MODEL, LiveServer
from tiny import (QWEN_TEMPLATE, _text_config, build_llava, build_llava_next, build_qwen2_vl, build_qwen3_vl,
                  write_tokenizer)
from tiny import build_internvl, build_pixtral
from tiny import build_mllama
from tiny import build_gemma3
from tiny import build_llava_onevision
from tiny import build_idefics3


def build_text(folder):
    from transformers import Qwen2ForCausalLM
    vocab = write_tokenizer(folder, "qwen2")
    torch.manual_seed(0)
    Qwen2ForCausalLM(_text_config("qwen2", vocab, tie=True)).eval().save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    return folder


BUILDERS = {
    "llava": lambda f: build_llava(f),
    "llava_next": lambda f: build_llava_next(f),
    "text_only": build_text,
    "qwen2_vl": lambda f: build_qwen2_vl(f, kind="qwen2_vl"),
    "qwen2_5_vl": lambda f: build_qwen2_vl(f, kind="qwen2_5_vl"),
    "qwen3_vl": build_qwen3_vl,
    "internvl": build_internvl,
    "pixtral": lambda f: build_pixtral(f, kind="llava"),
    "mistral3": lambda f: build_pixtral(f, kind="mistral3"),
    "mllama": build_mllama,
    "gemma3": build_gemma3,
    "llava_onevision": lambda f: build_llava_onevision(f),
    "idefics3": lambda f: build_idefics3(f, kind="idefics3"),
    "smolvlm": lambda f: build_idefics3(f, kind="smolvlm", longest_edge=64),
}
MODULE_OF = {"llava": "llava", "llava_next": "llava", "text_only": "text_only", "qwen2_vl": "qwen2_vl",
             "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl", "internvl": "internvl",
             "pixtral": "pixtral", "mistral3": "pixtral",
             "mllama": "mllama",
             "gemma3": "gemma3",
             "llava_onevision": "llava_onevision", "idefics3": "idefics3", "smolvlm": "idefics3"}       # the family module each builder's checkpoint goes to
FAMILY_OF = {k: "text" if v == "text_only" else v for k, v in MODULE_OF.items()}   # its NAME


def test_every_registered_family_is_checked_here():
    registered = set(registry.MODEL_TYPES.values()) | set(registry.ARCHITECTURES.values())
    assert registered == set(MODULE_OF.values()), f"a family without a builder here: {registered - set(MODULE_OF.values())}"
    for name, module in MODULE_OF.items():
        assert registry.family(module).NAME == FAMILY_OF[name]


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, folder, foveal.load(str(folder), dtype="float32")


def _image(w=90, h=60):
    g = torch.Generator().manual_seed(w * h)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _ask(vlm, text, image=None):
    has_vision = vlm.describe()["vision_tower"] is not None
    parts = ([{"type": "image", "image": image}] if image is not None and has_vision else [])
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def test_load_describe_and_count(model):
    name, folder, vlm = model
    d = vlm.describe()
    assert d["family"] == FAMILY_OF[name]
    messages = _ask(vlm, "What is this?", _image())
    r = vlm.generate(messages, max_tokens=6)
    assert r.finish_reason in ("stop", "length") and len(r.token_ids) <= 6
    assert r.stats.prompt_tokens == vlm.count_tokens(messages)
    if d["vision_tower"] is not None:
        assert r.stats.images == 1 and r.stats.image_tokens == vlm.image_tokens((60, 90)) > 0
        assert vlm.parameter_counts()["vision"] > 0


def test_stream_equals_generate_and_the_next_turn_reuses_the_prefix(model):
    _, _, vlm = model
    messages = _ask(vlm, "Describe it.", _image(70, 40))
    first = vlm.generate(messages, max_tokens=8, temperature=0.0)
    chunks = list(vlm.stream(messages, max_tokens=8, temperature=0.0))
    assert "".join(c.text for c in chunks) == first.text
    assert [t for c in chunks for t in c.token_ids] == first.token_ids
    assert chunks[-1].stats.cached_tokens > 0
    follow = messages + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And?"}]
    cached = vlm.generate(follow, max_tokens=6, temperature=0.0)
    vlm.engine.reset()
    fresh = vlm.generate(follow, max_tokens=6, temperature=0.0)
    assert cached.token_ids == fresh.token_ids and cached.stats.cached_tokens > 0


def test_prompt_logits_do_not_depend_on_the_image_cache(model):
    _, _, vlm = model
    messages = _ask(vlm, "What?", _image(50, 80))
    vlm.unload()
    ids, cold = vlm.prompt_logits(messages)
    _, warm = vlm.prompt_logits(messages)
    assert torch.equal(cold, warm) and len(ids) == cold.shape[0]


def test_info_and_plan(model, capsys):
    name, folder, vlm = model
    d = info_dict(vlm)
    assert d["family"] == FAMILY_OF[name] and d["parameters"]["total"] > 0
    assert cli_main(["info", str(folder)]) == 0
    assert "image tokens/image" in capsys.readouterr().out
    p = plan(folder, images=1, ctx=256, memory="8GiB")
    assert p.fits and p.kv_cache > 0 and p.layers > 0
    if d["vision_tower"] is not None:
        assert p.image_tokens_per_image >= vlm.image_tokens((60, 90)) and p.vision_activations > 0
        assert p.vision > 0


def test_int8_quantized_load_answers(model):
    _, folder, vlm = model
    q = foveal.load(str(folder), dtype="float32", quant="int8")
    messages = _ask(vlm, "What is this?", _image())
    assert q.count_tokens(messages) == vlm.count_tokens(messages)
    assert len(q.generate(messages, max_tokens=4).token_ids) <= 4


def test_bad_image_is_refused_by_name_and_the_model_keeps_answering(model):
    _, _, vlm = model
    if vlm.describe()["vision_tower"] is None:
        with pytest.raises(PromptError, match="no vision tower"):
            vlm.generate([{"role": "user", "content": [{"type": "image", "image": _image()},
                                                         {"type": "text", "text": "hi"}]}])
    else:
        with pytest.raises(foveal.FovealError, match="image"):
            vlm.generate(_ask(vlm, "hi", b"not an image at all"), max_tokens=2)
    assert vlm.generate(_ask(vlm, "hi", _image()), max_tokens=2).finish_reason in ("stop", "length")


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_both_servers_answer_with_the_official_clients(model):
    _, _, vlm = model
    has_vision = vlm.describe()["vision_tower"] is not None
    b64 = _data_uri(_image())
    with LiveServer(vlm) as server:
        show = ollama.Client(host=server.url).show(MODEL)
        assert ("vision" in show.capabilities) == has_vision
        r = ollama.Client(host=server.url).chat(
            model=MODEL, messages=[{"role": "user", "content": "What is it?", **({"images": [b64]} if has_vision else {})}],
            options={"num_predict": 4, "temperature": 0})
        expected = vlm.generate(_ask(vlm, "What is it?", _image()), max_tokens=4, temperature=0.0)
        assert r.message.content == expected.text
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        content = [{"type": "text", "text": "What is it?"}]
        if has_vision:
            content.insert(0, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}})
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                             max_tokens=4, temperature=0)
        assert out.choices[0].message.content == expected.text


def test_quantize_command_writes_a_checkpoint_that_loads_and_answers_as_in_memory(model, tmp_path):
    _, folder, vlm = model
    out = tmp_path / "q8"
    assert cli_main(["quantize", str(folder), str(out), "--mode", "int8", "--dtype", "float32"]) == 0
    saved = foveal.load(str(out), dtype="float32")
    direct = foveal.load(str(folder), dtype="float32", quant="int8")
    messages = _ask(vlm, "What is this?", _image())
    assert torch.equal(saved.prompt_logits(messages)[1], direct.prompt_logits(messages)[1])


def test_eval_command_scores_a_benchmark_file(model, tmp_path, capsys):
    from foveal.data import write_dataset
    from foveal.eval import load_report
    _, folder, vlm = model
    if vlm.describe()["vision_tower"] is None:
        pytest.skip("the benchmark files ask about images")
    world = write_dataset(tmp_path / "world", n=2, seed=7, formats=("pope",))
    out = tmp_path / "run.json"
    assert cli_main(["eval", str(folder), "--data", str(world["pope"]), "--limit", "3", "--max-tokens", "2",
                     "--dtype", "float32", "--out", str(out), "--no-chart"]) == 0
    report = load_report(out)
    assert report["overall"]["count"] == 3 and report["overall"]["errors"] == 0
