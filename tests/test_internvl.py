"""InternVL (transformers' InternVLForConditionalGeneration) through the family seam, against transformers.

Tiny random checkpoints saved by save_pretrained (tests/tiny.py): the prompt ids and pixel tensors come from
transformers' own InternVLProcessor (GotOcr2ImageProcessorPil under it) and the logits from
InternVLForConditionalGeneration, in float32. Two towers: InternVL3's (LayerNorm, no QK norm, the last
layer's output) and the InternViT-6B style (RMSNorm, QK norm, q/k/v bias, a final LayerNorm and features
from the layer before the last).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import foveal
from foveal.errors import ConfigError, PromptError
from tiny import INTERNVL_TILE, build_internvl, hf_internvl, hf_internvl_processor
from tiny import ask as _ask, random_image as _image

TOWERS = {
    "internvl3": dict(),
    "rms_qk": dict(norm_type="rms_norm", qk_norm=True, attention_bias=True, mean_pooling=False, feature_layer=-2,
                   tie=False),
}
# (width, height): tall, wide, smaller than a tile, square-ish odd
SIZES = [(60, 100), (200, 40), (20, 14), (57, 61)]


@pytest.fixture(scope="module", params=list(TOWERS))
def pair(request, tmp_path_factory):
    folder = build_internvl(tmp_path_factory.mktemp(request.param), **TOWERS[request.param])
    return request.param, folder, foveal.load(str(folder), dtype="float32"), hf_internvl(folder), \
        hf_internvl_processor(folder)


def _hf_inputs(processor, messages, images):
    parts = [[{"type": "image"} if p["type"] == "image" else p for p in m["content"]]
             if isinstance(m["content"], list) else m["content"] for m in messages]
    text = processor.apply_chat_template([{"role": m["role"], "content": c} for m, c in zip(messages, parts)],
                                         add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=images or None, return_tensors="pt")


def _logits(hf, inputs):
    with torch.no_grad():
        return hf(**inputs).logits[0]


@pytest.mark.parametrize("size", SIZES)
def test_prompt_ids_pixels_and_logits_match_transformers(pair, size):
    _, _, ours, hf, processor = pair
    image = _image(size)
    messages = _ask("What is in this image?", image)
    ref_inputs = _hf_inputs(processor, messages, [image])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    pixels, counts = ours.processor.pixels(ours.processor.prepare(messages, ours.image_limits).images)
    assert torch.equal(pixels, ref_inputs["pixel_values"]) and counts == [pixels.shape[0]]
    assert (logits - _logits(hf, ref_inputs)).abs().max().item() <= 1e-4
    assert ours.count_tokens(messages) == len(ids)
    n_context = ref_inputs["input_ids"][0].eq(ours.config.image_token_id).sum().item()
    assert ours.image_tokens((size[1], size[0])) == n_context == 4 * pixels.shape[0]


def test_tile_grids_follow_the_aspect(pair):
    _, _, ours, _, _ = pair
    p = ours.processor
    assert p.tile_grid((100, 60)) == (2, 3) and p.image_tokens((100, 60)) == 4 * 7    # tall: 2x3 + thumbnail
    assert p.tile_grid((100, 50)) == (1, 2) and p.image_tokens((100, 50)) == 4 * 3    # 1:2 exactly
    assert p.tile_grid((40, 200)) == (5, 1) and p.image_tokens((40, 200)) == 4 * 6    # wide: 5x1 + thumbnail
    assert p.tile_grid((14, 20)) == (3, 2)           # smaller than a tile: tiled by its aspect all the same
    assert p.tile_grid((14, 14)) == (1, 1) and p.image_tokens((14, 14)) == 4          # one tile, no thumbnail
    assert p.tile_grid((40, 40)) == (1, 1)           # 1:1 ties with 2x2; 2x2 would cover over twice its area
    assert p.tile_grid((50, 50)) == (2, 2)           # ... and here no longer does
    assert ours.describe()["max_image_tokens"] == 4 * (INTERNVL_TILE["max_patches"] + 1)


def test_tile_grid_and_count_equal_transformers_over_many_sizes(pair):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
    _, _, ours, _, processor = pair
    s = INTERNVL_TILE["image_size"]
    for h in range(1, 400, 13):
        for w in range(1, 400, 17):
            assert ours.processor.tile_grid((h, w)) == get_optimal_tiled_canvas((h, w), (s, s), 1, 6)
            assert ours.image_tokens((h, w)) == 4 * processor.image_processor.get_number_of_image_patches(
                h, w, {"crop_to_patches": True})


def test_two_images_and_a_multi_turn_chat(pair):
    _, _, ours, hf, processor = pair
    a, b, c = _image((100, 60), 1), _image((64, 200), 2), _image((90, 90), 3)
    messages = [{"role": "system", "content": "You answer briefly."},
                *_ask("Compare these.", a, b),
                {"role": "assistant", "content": "The first is wider."},
                *_ask("And this one?", c)]
    ref_inputs = _hf_inputs(processor, messages, [a, b, c])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    pixels, counts = ours.processor.pixels(ours.processor.prepare(messages, ours.image_limits).images)
    assert torch.equal(pixels, ref_inputs["pixel_values"]) and len(counts) == 3
    assert (logits - _logits(hf, ref_inputs)).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers_for_32_tokens(pair):
    _, _, ours, hf, processor = pair
    image = _image((120, 80), 4)
    messages = _ask("Describe it.", image)
    ref_inputs = _hf_inputs(processor, messages, [image])
    with torch.no_grad():
        ref = hf.generate(**ref_inputs, max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, ref_inputs["input_ids"].shape[1]:]
    ours.engine.eos_ids, eos = set(), ours.engine.eos_ids
    try:
        r = ours.generate(messages, max_tokens=32, temperature=0.0)
        again = ours.generate(messages, max_tokens=32, temperature=0.0)     # from the cached prefix
    finally:
        ours.engine.eos_ids = eos
    assert r.token_ids == ref.tolist()
    assert again.token_ids == r.token_ids and again.stats.cached_tokens > 0
    assert r.stats.images == 1 and r.stats.image_tokens == ours.image_tokens((80, 120))


def test_the_image_changes_the_answer(pair):
    _, _, ours, _, _ = pair
    one = ours.prompt_logits(_ask("What?", _image((60, 100), 1)))[1]
    other = ours.prompt_logits(_ask("What?", _image((60, 100), 2)))[1]
    assert (one - other).abs().max().item() > 1e-3


def test_text_only_prompt_and_info(pair):
    name, _, ours, hf, processor = pair
    messages = [{"role": "user", "content": "hello world"}]
    ref_inputs = _hf_inputs(processor, messages, [])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    assert (logits - _logits(hf, ref_inputs)).abs().max().item() <= 1e-4
    d = ours.describe()
    assert d["family"] == "internvl" and d["vision_tower"] == "internvl_vision" and d["image_size"] == 32
    assert ours.parameter_counts()["vision"] > 0 and ours.parameter_counts()["projector"] > 0


def test_a_budget_is_kept_or_refused_never_met_by_retiling(pair):
    _, _, ours, _, _ = pair
    messages = _ask("What?", _image((200, 40)))                              # 24 tokens
    assert ours.count_tokens(messages, max_image_tokens=24) == ours.count_tokens(messages)
    with pytest.raises(PromptError, match="24 tokens .* outside the request's image-token budget"):
        ours.generate(messages, max_image_tokens=8)


# ---- bad checkpoints: each a clear error -------------------------------------------------------
def _edited(folder, tmp_path, edit, file="config.json"):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    d = json.loads((out / file).read_text())
    edit(d)
    (out / file).write_text(json.dumps(d))
    return out


@pytest.mark.parametrize("edit, file, match", [
    (lambda d: d.update(image_token_id=7), "config.json", r"image_token_id 7 is not the tokenizer's <IMG_CONTEXT>"),
    (lambda d: d.update(image_seq_length=16), "config.json", r"image_seq_length 16 differs .* = 4"),
    (lambda d: d.update(vision_feature_select_strategy="full"), "config.json", "select_strategy 'full'"),
    (lambda d: d.update(downsample_ratio=0.3), "config.json", "downsample_ratio 0.3"),
    (lambda d: d["vision_config"].update(norm_type="batch_norm"), "config.json", "norm_type 'batch_norm'"),
    (lambda d: d.update(vision_feature_layer=[-1, -2]), "config.json", r"vision_feature_layer \[-1, -2\]"),
    (lambda d: d.update(size={"height": 64, "width": 64}), "preprocessor_config.json", "64-px tiles.*32-px"),
    (lambda d: d.update(image_seq_length=9), "processor_config.json", "image_seq_length 9 differs"),
])
def test_bad_configs_are_refused_by_name(pair, tmp_path, edit, file, match):
    name, folder, *_ = pair
    if name != "internvl3":
        pytest.skip("the config checks do not depend on the tower")
    with pytest.raises(ConfigError, match=match):
        foveal.load(str(_edited(folder, tmp_path, edit, file)))
