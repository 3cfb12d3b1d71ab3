"""Qwen3-VL through the family seam: the whole model against transformers.

A tiny random checkpoint saved by save_pretrained (tests/tiny.py: 16-px patches, a 4x4 learned position
table, DeepStack from two blocks, a Qwen3 decoder with q/k norms and interleaved M-RoPE); the prompt ids
and pixel tensors come from transformers' own Qwen3VLProcessor (over the image processor
AutoImageProcessor picks) and the logits from Qwen3VLForConditionalGeneration, in float32.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import foveal
from foveal.errors import ConfigError
from foveal.models import registry
from foveal.models.families import qwen3_vl
from tiny import QWEN3_VL_PIXELS, build_qwen3_vl, hf_qwen3_vl, hf_qwen3_vl_processor
from tiny import ask as _ask, random_image as _image

# odd sizes and aspects; 20x30 lies below min_pixels (grows), 700x500 above max_pixels (shrinks)
SIZES = [(100, 60), (20, 30), (700, 500), (57, 333)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = build_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"))
    return folder, foveal.load(str(folder), dtype="float32"), hf_qwen3_vl(folder), hf_qwen3_vl_processor(folder)


def _hf_inputs(processor, messages, images):
    parts = [[{"type": "image"} if p["type"] == "image" else p for p in m["content"]]
             if isinstance(m["content"], list) else m["content"] for m in messages]
    hf_messages = [{"role": m["role"], "content": c} for m, c in zip(messages, parts)]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=images or None, return_tensors="pt")


def _hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(**inputs).logits[0]


def test_the_image_processor_is_qwen2_vls_pil_one(pair):
    folder, *_, processor = pair
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.image_processor.patch_size == 16 and processor.image_processor.merge_size == 2


@pytest.mark.parametrize("size", SIZES)
def test_prompt_logits_match_transformers(pair, size):
    _, ours, hf, processor = pair
    image = _image(size)
    messages = _ask("What is in this image?", image)
    ref_inputs = _hf_inputs(processor, messages, [image])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    pixels, grid = ours.processor.pixels([ours.processor.prepare(messages, ours.image_limits).images[0]])
    assert torch.equal(grid, ref_inputs["image_grid_thw"])
    assert torch.equal(pixels, ref_inputs["pixel_values"])
    assert (logits - _hf_logits(hf, ref_inputs)).abs().max().item() <= 1e-4
    assert ours.count_tokens(messages) == len(ids)


def test_deepstack_matters_to_the_logits(pair):
    """The parity above is not vacuous: without the deepstack additions the logits move."""
    _, ours, _, _ = pair
    messages = _ask("What is in this image?", _image((100, 60)))
    full = ours.prompt_logits(messages)[1]
    model = ours.engine.model
    forward = type(model).forward
    try:
        type(model).forward = lambda self, *a, **k: (setattr(self, "_deepstack", None), forward(self, *a, **k))[1]
        without = ours.prompt_logits(messages)[1]
    finally:
        type(model).forward = forward
    assert (full - without).abs().max().item() > 1e-2


def test_two_images_and_a_multi_turn_chat(pair):
    _, ours, hf, processor = pair
    a, b = _image((100, 60), 1), _image((64, 200), 2)
    messages = [{"role": "system", "content": "You answer briefly."},
                *_ask("Compare these.", a, b),
                {"role": "assistant", "content": "The first is wider."},
                *_ask("And this one?", _image((90, 90), 3))]
    images = [a, b, messages[-1]["content"][0]["image"]]
    ref_inputs = _hf_inputs(processor, messages, images)
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    assert (logits - _hf_logits(hf, ref_inputs)).abs().max().item() <= 1e-4


def _greedy(ours, messages, n=32):
    ours.engine.eos_ids, eos = set(), ours.engine.eos_ids
    try:
        return ours.generate(messages, max_tokens=n, temperature=0.0)
    finally:
        ours.engine.eos_ids = eos


def _hf_greedy(hf, inputs, n=32):
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_greedy_tokens_match_transformers_for_32_tokens(pair):
    _, ours, hf, processor = pair
    image = _image((120, 80), 4)
    messages = _ask("Describe it.", image)
    ref_inputs = _hf_inputs(processor, messages, [image])
    ref = _hf_greedy(hf, ref_inputs)
    r = _greedy(ours, messages)
    again = _greedy(ours, messages)      # the whole prompt but its last token reused from the cache
    assert r.token_ids == ref
    assert again.token_ids == r.token_ids and again.stats.cached_tokens > 0
    assert r.stats.images == 1 and r.stats.image_tokens == ref_inputs["input_ids"][0].eq(
        ours.config.image_token_id).sum().item()


def test_a_new_image_after_a_reused_prefix_gets_its_own_deepstack_rows(pair):
    """Turn 2 reuses turn 1 (with its image) from the cache and prefills a new image: the deepstack rows
    of the prefilled window must be the new image's."""
    _, ours, hf, processor = pair
    first, second = _image((100, 60), 5), _image((70, 90), 6)
    turn1 = _ask("What is this?", first)
    r1 = _greedy(ours, turn1, 4)
    turn2 = [*turn1, {"role": "assistant", "content": r1.text}, *_ask("And this?", second)]
    r2 = _greedy(ours, turn2)
    assert r2.stats.cached_tokens > r1.stats.image_tokens       # the reused prefix holds the first image
    assert r2.token_ids == _hf_greedy(hf, _hf_inputs(processor, turn2, [first, second]))


def test_text_only_prompt(pair):
    _, ours, hf, processor = pair
    messages = [{"role": "user", "content": "hello world"}]
    ref_inputs = _hf_inputs(processor, messages, [])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    assert (logits - _hf_logits(hf, ref_inputs)).abs().max().item() <= 1e-4
    assert _greedy(ours, messages, 8).token_ids == _hf_greedy(hf, ref_inputs, 8)


def test_registry_info_and_image_token_budget(pair):
    _, ours, _, _ = pair
    assert registry.family_name({"model_type": "qwen3_vl"}) == "qwen3_vl"
    assert registry.family_name({"architectures": ["Qwen3VLForConditionalGeneration"]}) == "qwen3_vl"
    d = ours.describe()
    assert d["family"] == "qwen3_vl" and d["deepstack_visual_indexes"] == [0, 2] and d["patch_size"] == 16
    assert d["min_pixels"] == QWEN3_VL_PIXELS["min_pixels"] and d["max_image_tokens"] == 64
    assert ours.image_tokens((32, 32)) == 4 and ours.image_tokens((256, 256)) == 64   # 64x64 and 256x256 px
    assert ours.parameter_counts()["vision"] > 0


def test_config_defaults_are_hf_class_defaults():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import (Qwen3VLConfig, Qwen3VLTextConfig,
                                                                     Qwen3VLVisionConfig)
    hf, text, vision = Qwen3VLConfig(), Qwen3VLTextConfig(), Qwen3VLVisionConfig()
    # the class defaults disagree (vision out 3584, text hidden 4096): give the tower the text's width
    cfg = qwen3_vl.config({"model_type": "qwen3_vl", "vision_config": {"out_hidden_size": 4096}})
    t = cfg.text
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.head_dim, t.max_position_embeddings, t.rms_norm_eps, t.rope.theta) == (
        text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
        text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.max_position_embeddings,
        text.rms_norm_eps, text.default_theta)
    assert t.qk_norm and t.mrope_interleaved and not t.attention_bias and t.mrope_section == (24, 20, 20)
    v = cfg.vision
    assert (v.depth, v.width, v.num_heads, v.intermediate_size, v.hidden_act, v.patch_size,
            v.num_position_embeddings, v.deepstack_visual_indexes) == (
        vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size, vision.hidden_act,
        vision.patch_size, vision.num_position_embeddings, tuple(vision.deepstack_visual_indexes))
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) == (
        hf.image_token_id, hf.video_token_id, hf.vision_start_token_id)


# ---- bad input: each a clear error -------------------------------------------------------------
def _edited(folder, tmp_path, edit, file="config.json"):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    d = json.loads((out / file).read_text())
    edit(d)
    (out / file).write_text(json.dumps(d))
    return out


def test_inconsistent_mrope_section_is_refused(pair, tmp_path):
    folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d["text_config"]["rope_parameters"].update(mrope_section=[2, 3, 4]))
    with pytest.raises(ConfigError, match=r"mrope_section \[2, 3, 4\] sums to 9.*head_dim / 2 = 8"):
        foveal.load(str(bad))


@pytest.mark.parametrize("indexes, named", [
    ([0, 3], r"vision_config.deepstack_visual_indexes holds 3, not a block index in 0..2"),
    ([1, 1], r"vision_config.deepstack_visual_indexes \[1, 1\] names a block twice"),
    ([0, 1, 2, 0.5], r"vision_config.deepstack_visual_indexes holds 0.5"),
])
def test_wrong_deepstack_index_is_refused(pair, tmp_path, indexes, named):
    folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d["vision_config"].update(deepstack_visual_indexes=indexes))
    with pytest.raises(ConfigError, match=named):
        foveal.load(str(bad))


def test_more_deepstack_features_than_decoder_layers_is_refused(pair, tmp_path):
    folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d["text_config"].update(num_hidden_layers=1))
    with pytest.raises(ConfigError, match="deepstack_visual_indexes has 2 entries.*only 1 layers"):
        foveal.load(str(bad))


def test_processor_with_qwen2_vl_patches_is_refused(pair, tmp_path):
    """A preprocessor_config.json without patch_size gets Qwen2VLImageProcessorPil's 14 (as in HF)."""
    folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d.pop("patch_size"), file="preprocessor_config.json")
    with pytest.raises(ConfigError, match="14-px patches.*16-px patches"):
        foveal.load(str(bad))
