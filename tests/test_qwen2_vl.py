"""Qwen2-VL and Qwen2.5-VL through the family seam: the whole model against transformers.

Tiny random checkpoints saved by save_pretrained (tests/tiny.py); the prompt ids and pixel tensors
come from transformers' own Qwen2VLProcessor and the logits from Qwen2VLForConditionalGeneration /
Qwen2_5_VLForConditionalGeneration, in float32.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

import foveal
from foveal.errors import ConfigError, ImageError, UnsupportedModelError
from tiny import QWEN_VL_PIXELS, build_qwen2_vl, hf_qwen2_vl, hf_qwen2_vl_processor
from tiny import ask as _ask, random_image as _image

KINDS = ("qwen2_vl", "qwen2_5_vl")
# odd sizes and aspects; 20x30 lies below min_pixels (grows), 700x500 above max_pixels (shrinks)
SIZES = [(100, 60), (20, 30), (700, 500), (57, 333)]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    folder = build_qwen2_vl(tmp_path_factory.mktemp(request.param), kind=request.param)
    return request.param, folder, foveal.load(str(folder), dtype="float32"), hf_qwen2_vl(folder), \
        hf_qwen2_vl_processor(folder)


def _hf_inputs(processor, messages, images):
    parts = [[{"type": "image"} if p["type"] == "image" else p for p in m["content"]]
             if isinstance(m["content"], list) else m["content"] for m in messages]
    hf_messages = [{"role": m["role"], "content": c} for m, c in zip(messages, parts)]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=images or None, return_tensors="pt")


@pytest.mark.parametrize("size", SIZES)
def test_prompt_logits_match_transformers(pair, size):
    kind, _, ours, hf, processor = pair
    image = _image(size)
    messages = _ask("What is in this image?", image)
    ref_inputs = _hf_inputs(processor, messages, [image])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    pixels, grid = ours.processor.pixels([ours.processor.prepare(messages, ours.image_limits).images[0]])
    assert torch.equal(grid, ref_inputs["image_grid_thw"])
    assert torch.equal(pixels, ref_inputs["pixel_values"])
    with torch.no_grad():
        ref = hf(**ref_inputs).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4
    assert ours.count_tokens(messages) == len(ids)


def test_two_images_and_a_multi_turn_chat(pair):
    kind, _, ours, hf, processor = pair
    a, b = _image((100, 60), 1), _image((64, 200), 2)
    messages = [{"role": "system", "content": "You answer briefly."},
                *_ask("Compare these.", a, b),
                {"role": "assistant", "content": "The first is wider."},
                *_ask("And this one?", _image((90, 90), 3))]
    images = [a, b, messages[-1]["content"][0]["image"]]
    ref_inputs = _hf_inputs(processor, messages, images)
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = hf(**ref_inputs).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4


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
        # the next turn reuses the cached prefix (positions continue where the first turn's stopped)
        again = ours.generate(messages, max_tokens=32, temperature=0.0)
    finally:
        ours.engine.eos_ids = eos
    assert r.token_ids == ref.tolist()
    assert again.token_ids == r.token_ids and again.stats.cached_tokens > 0
    assert r.stats.images == 1 and r.stats.image_tokens == ref_inputs["input_ids"][0].eq(
        ours.config.image_token_id).sum().item()


def test_stream_and_text_only_prompt(pair):
    kind, _, ours, hf, processor = pair
    messages = [{"role": "user", "content": "hello world"}]
    ref_inputs = _hf_inputs(processor, messages, [])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = hf(**ref_inputs).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4
    chunks = list(ours.stream(messages, max_tokens=5))
    assert chunks[-1].done and sum(len(c.token_ids) for c in chunks) == chunks[-1].stats.generated_tokens


def test_legacy_layout_loads_the_same(pair, tmp_path):
    kind, folder, ours, _, _ = pair
    legacy = build_qwen2_vl(tmp_path / "legacy", kind=kind, layout="legacy")
    assert "text_config" not in json.loads((legacy / "config.json").read_text())
    other = foveal.load(str(legacy), dtype="float32")
    messages = _ask("What is it?", _image((100, 60)))
    assert torch.equal(other.prompt_logits(messages)[1], ours.prompt_logits(messages)[1])


def test_info_and_image_token_budget(pair):
    kind, _, ours, _, _ = pair
    d = ours.describe()
    assert d["family"] == "qwen2_vl" and d["layout"] == kind and d["vision_tower"] is not None
    assert d["min_pixels"] == QWEN_VL_PIXELS["min_pixels"] and d["max_pixels"] == QWEN_VL_PIXELS["max_pixels"]
    assert d["max_image_tokens"] == 64
    assert ours.image_tokens((30, 30)) == 4 and ours.image_tokens((20, 30)) == 6   # 56x56 and 56x84 px
    assert ours.image_tokens((224, 224)) == 64 and ours.image_tokens((5000, 5000)) == 49   # floored to 196 px
    assert ours.parameter_counts()["vision"] > 0


# ---- bad input: each a clear error -------------------------------------------------------------
def _edited(folder, tmp_path, edit, file="config.json"):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    d = json.loads((out / file).read_text())
    edit(d)
    (out / file).write_text(json.dumps(d))
    return out


def test_inconsistent_mrope_section_is_refused(pair, tmp_path):
    _, folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d["text_config"]["rope_parameters"].update(mrope_section=[2, 3, 4]))
    with pytest.raises(ConfigError, match=r"mrope_section \[2, 3, 4\] sums to 9.*head_dim / 2 = 8"):
        foveal.load(str(bad))


def test_processor_that_disagrees_with_the_tower_is_refused(pair, tmp_path):
    _, folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d.update(patch_size=16), file="preprocessor_config.json")
    with pytest.raises(ConfigError, match="16-px patches.*14-px patches"):
        foveal.load(str(bad))


def test_image_token_that_is_not_the_tokenizers_is_refused(pair, tmp_path):
    _, folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d.update(image_token_id=7))
    with pytest.raises(ConfigError, match=r"image_token_id 7 is not the tokenizer's <\|image_pad\|>"):
        foveal.load(str(bad))


def test_extreme_aspect_image_is_refused_and_the_model_keeps_answering(pair):
    _, _, ours, _, _ = pair
    with pytest.raises(ImageError, match="aspect"):
        ours.generate(_ask("What?", Image.new("RGB", (4000, 10))), max_tokens=2)
    assert ours.generate(_ask("What?", _image((50, 50))), max_tokens=2).stats.images == 1


def test_unknown_family_lists_what_is_supported():
    with pytest.raises(UnsupportedModelError) as info:
        foveal.models.registry.family_for({"model_type": "no_such_vlm", "architectures": ["NoSuchVLMForConditionalGeneration"]})
    msg = str(info.value)
    assert "'no_such_vlm'" in msg and "Qwen2-VL" in msg and "LLaVA" in msg and "text-only" in msg


# ---- a request's image-token budget ------------------------------------------------------------
def test_image_token_budget_matches_transformers_with_the_same_pixel_budget(pair):
    import transformers as T
    kind, folder, ours, hf, processor = pair
    image = _image((700, 500), 5)
    messages = _ask("What is in this image?", image)
    low = dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    budget_processor = T.Qwen2VLProcessor.__new__(T.Qwen2VLProcessor)
    budget_processor.__dict__.update(processor.__dict__)
    budget_processor.image_processor = T.Qwen2VLImageProcessorPil(**low, patch_size=14, merge_size=2,
                                                                  temporal_patch_size=2)
    ref_inputs = _hf_inputs(budget_processor, messages, [image])
    ids, logits = ours.prompt_logits(messages, min_image_tokens=4, max_image_tokens=16)
    assert ids == ref_inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = hf(**ref_inputs).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4
    n = ref_inputs["input_ids"][0].eq(ours.config.image_token_id).sum().item()
    assert 4 <= n <= 16 < ours.image_tokens((500, 700))
    assert ours.count_tokens(messages, max_image_tokens=16) == len(ids)
    # the same image without the budget is encoded again, not taken from the cache at its other size
    r = ours.generate(messages, max_tokens=1)
    assert r.stats.image_tokens == ours.image_tokens((500, 700))
    assert ours.generate(messages, max_tokens=1, max_image_tokens=16).stats.image_tokens == n


def test_an_empty_or_nonsensical_budget_is_refused_by_name(pair):
    _, _, ours, _, _ = pair
    messages = _ask("What?", _image((100, 60)))
    from foveal.errors import PromptError, SamplingError
    with pytest.raises(SamplingError, match="min_image_tokens .* is above max_image_tokens"):
        ours.generate(messages, min_image_tokens=20, max_image_tokens=10)
    with pytest.raises(SamplingError, match="max_image_tokens must be >= 1"):
        ours.generate(messages, max_image_tokens=0)
    with pytest.raises(PromptError, match="budget .* is empty"):
        ours.generate(messages, min_image_tokens=1000)     # above the model's own 64-token maximum
