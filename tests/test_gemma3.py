"""Gemma 3 through the family seam: the whole model against transformers.

A tiny random checkpoint saved by save_pretrained (tests/tiny.py: a 2-layer SigLIP over 32-px images pooled to
4 soft tokens, a 3-layer decoder sliding / global / sliding with a window of 8, shorter than every prompt and
than the 32 generated tokens); prompt ids and pixels come from transformers' Gemma3Processor (over
Gemma3ImageProcessorPil) through apply_chat_template, the logits from Gemma3ForConditionalGeneration, in float32.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import foveal
from foveal.errors import ConfigError
from foveal.models import registry
from foveal.models.families.gemma3 import config as gemma3_config
from tiny import build_gemma3, hf_gemma3, hf_gemma3_processor
from tiny import ask as _ask, random_image as _image

SIZES = [(50, 37), (333, 57), (16, 16)]      # (width, height): odd, wide, smaller than the tower's 32 px


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = build_gemma3(tmp_path_factory.mktemp("gemma3"))
    return folder, foveal.load(str(folder), dtype="float32"), hf_gemma3(folder), hf_gemma3_processor(folder)


def _hf_inputs(processor, messages):
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def _hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(**inputs).logits[0]


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


@pytest.mark.parametrize("size", SIZES)
def test_prompt_ids_pixels_and_logits_match_transformers(pair, size):
    _, ours, hf, processor = pair
    messages = _ask("What is in this image?", _image(size))
    ref = _hf_inputs(processor, messages)
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref["input_ids"][0].tolist()
    assert ref["token_type_ids"][0].bool().tolist() == ours.processor.prepare(messages, ours.image_limits).image_mask
    pixels, counts = ours.processor.pixels(ours.processor.prepare(messages, ours.image_limits).images)
    assert torch.equal(pixels, ref["pixel_values"])
    assert len(ids) > ours.config.text.sliding_window
    assert (logits - _hf_logits(hf, ref)).abs().max().item() <= 1e-4
    assert ours.count_tokens(messages) == len(ids)


def test_image_tokens_are_wrapped_as_gemma3processor_writes_them(pair):
    _, ours, _, _ = pair
    p = ours.processor.prepare(_ask("Hi", _image((40, 30))), ours.image_limits)
    text = ours.tokenizer.decode(p.input_ids, skip_special_tokens=False)
    assert "\n\n<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>\n\n" in text
    assert sum(p.image_mask) == 4 and p.images[0].n_tokens == 4


def test_bidirectional_image_attention_and_the_window_matter(pair):
    """The parity above is not vacuous: a causal-only prefill, or a window as wide as the prompt, moves
    the logits."""
    _, ours, _, _ = pair
    messages = _ask("What is in this image?", _image((50, 37)))
    full = ours.prompt_logits(messages)[1]
    model = ours.engine.model
    embed = type(model).embed
    try:
        type(model).embed = lambda self, *a, **k: (embed(self, *a, **k), setattr(self, "_blocks", None))[0]
        causal = ours.prompt_logits(messages)[1]
    finally:
        type(model).embed = embed
    assert (full - causal).abs().max().item() > 1e-3
    window, ours.config.text.sliding_window = ours.config.text.sliding_window, 10_000
    try:
        for layer in model.language_model.layers:
            if layer.sliding:
                layer.self_attn.window = 10_000
        wide = ours.prompt_logits(messages)[1]
    finally:
        ours.config.text.sliding_window = window
        for layer in model.language_model.layers:
            if layer.sliding:
                layer.self_attn.window = window
    assert (full - wide).abs().max().item() > 1e-3


def test_greedy_tokens_match_transformers_for_32_tokens_past_the_window(pair):
    _, ours, hf, processor = pair
    messages = _ask("What is it? Describe the picture in detail.", _image((50, 37)))
    ref_inputs = _hf_inputs(processor, messages)
    ref = _hf_greedy(hf, ref_inputs)
    r = _greedy(ours, messages)
    again = _greedy(ours, messages)      # the whole prompt but its last token reused from the cache
    assert r.token_ids == ref and len(set(ref)) > 8
    assert again.token_ids == r.token_ids and again.stats.cached_tokens > 0
    assert r.stats.images == 1 and r.stats.image_tokens == 4


def test_two_images_and_a_multi_turn_chat(pair):
    _, ours, hf, processor = pair
    a, b = _image((100, 60), 1), _image((64, 200), 2)
    messages = [{"role": "system", "content": "You answer briefly."},
                *_ask("Compare these.", a, b),
                {"role": "assistant", "content": "The first is wider."},
                *_ask("And this one?", _image((90, 90), 3))]
    ref = _hf_inputs(processor, messages)
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref["input_ids"][0].tolist()
    assert (logits - _hf_logits(hf, ref)).abs().max().item() <= 1e-4


def test_a_second_turn_with_a_new_image_after_a_reused_prefix(pair):
    """Turn 2 reuses turn 1 (with its image) from the cache and prefills a new image, whose rows must still
    see each other both ways."""
    _, ours, hf, processor = pair
    first, second = _image((100, 60), 5), _image((70, 90), 6)
    turn1 = _ask("What is this?", first)
    r1 = _greedy(ours, turn1, 4)
    turn2 = [*turn1, {"role": "assistant", "content": r1.text}, *_ask("And this?", second)]
    r2 = _greedy(ours, turn2)
    assert r2.stats.cached_tokens > r1.stats.image_tokens
    assert r2.token_ids == _hf_greedy(hf, _hf_inputs(processor, turn2))


def test_text_only_prompt(pair):
    _, ours, hf, processor = pair
    messages = [{"role": "user", "content": "hello world, the quick brown fox jumps over the lazy dog"}]
    ref = _hf_inputs(processor, messages)
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref["input_ids"][0].tolist()
    assert (logits - _hf_logits(hf, ref)).abs().max().item() <= 1e-4
    assert _greedy(ours, messages, 16).token_ids == _hf_greedy(hf, ref, 16)


def test_registry_and_info(pair):
    _, ours, _, _ = pair
    assert registry.family_name({"model_type": "gemma3"}) == "gemma3"
    assert registry.family_name({"architectures": ["Gemma3ForConditionalGeneration"]}) == "gemma3"
    d = ours.describe()
    assert d["family"] == "gemma3" and d["image_tokens_per_image"] == 4 and d["sliding_window"] == 8
    assert d["global_layers"] == [1]
    assert ours.image_tokens((500, 20)) == 4
    assert ours.parameter_counts()["vision"] > 0 and ours.parameter_counts()["projector"] > 0


def test_config_defaults_are_hf_class_defaults():
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig
    hf, text, vision = Gemma3Config(), Gemma3TextConfig(), SiglipVisionConfig()
    cfg = gemma3_config({"model_type": "gemma3", "vision_config": {"image_size": 896, "patch_size": 14}})
    t = cfg.text
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.head_dim, t.max_position_embeddings, t.rms_norm_eps, t.sliding_window,
            t.query_pre_attn_scalar, list(t.layer_types), t.tie_word_embeddings) == (
        text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
        text.num_key_value_heads, text.head_dim, text.max_position_embeddings, text.rms_norm_eps,
        text.sliding_window, text.query_pre_attn_scalar, text.layer_types, hf.tie_word_embeddings)
    assert (t.rope.theta, t.local_rope.theta) == (text.rope_parameters["full_attention"]["rope_theta"],
                                                  text.rope_parameters["sliding_attention"]["rope_theta"])
    v = cfg.vision
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.layer_norm_eps) == (
        vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads,
        vision.layer_norm_eps)
    assert (cfg.mm_tokens_per_image, cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id) == (
        hf.mm_tokens_per_image, hf.boi_token_index, hf.eoi_token_index, hf.image_token_index)
    assert cfg.pool_kernel == 4         # gemma-3-4b: 64 x 64 patches pooled 4 x 4 to 16 x 16


def test_the_old_config_form_reads_the_same():
    """transformers 4.x configs: rope_theta + rope_scaling (global), rope_local_base_freq, sliding_window_pattern."""
    old = gemma3_config({"model_type": "gemma3", "vision_config": {"image_size": 896, "patch_size": 14},
                         "text_config": {"num_hidden_layers": 12, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                         "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                                         "sliding_window_pattern": 6}})
    assert old.text.rope.kind == "linear" and old.text.rope.factor == 8.0 and old.text.local_rope.theta == 1e4
    assert [i for i, k in enumerate(old.text.layer_types) if k == "full_attention"] == [5, 11]


# ---- bad input: each a clear error -------------------------------------------------------------
def _edited(folder, tmp_path, edit, file="config.json"):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    d = json.loads((out / file).read_text())
    edit(d)
    (out / file).write_text(json.dumps(d))
    return out


@pytest.mark.parametrize("edit, named", [
    (lambda d: d.update(mm_tokens_per_image=5), r"mm_tokens_per_image 5 must be a square"),
    (lambda d: d.update(mm_tokens_per_image=9), r"mm_tokens_per_image 9 must be a square whose side divides"),
    (lambda d: d["text_config"].update(layer_types=["sliding_attention"]), r"text_config.layer_types must list 3"),
    (lambda d: d["text_config"]["rope_parameters"]["full_attention"].update(rope_type="yarn"),
     r"rope_parameters.full_attention.rope_type 'yarn' is not supported"),
    (lambda d: d["text_config"].update(hidden_activation="silu"), r"hidden_activation 'silu' is not supported"),
    (lambda d: d.update(image_token_index=10_000), r"image_token_index 10000 is not a token id"),
])
def test_bad_configs_are_refused_by_name(pair, tmp_path, edit, named):
    folder, *_ = pair
    with pytest.raises(ConfigError, match=named):
        foveal.load(str(_edited(folder, tmp_path, edit)))


@pytest.mark.parametrize("edit, named", [
    (lambda d: d.update(do_pan_and_scan="yes"), "do_pan_and_scan must be true or false"),
    (lambda d: d.update(do_pan_and_scan=True, pan_and_scan_max_num_crops=0), "pan_and_scan_max_num_crops must be"),
    (lambda d: d.update(do_pan_and_scan=True, pan_and_scan_min_ratio_to_activate=-1),
     "pan_and_scan_min_ratio_to_activate must be a positive number"),
    (lambda d: d.update(size={"height": 64, "width": 64}), "makes 64x64 px images.*takes 32x32"),
])
def test_bad_image_processor_configs_are_refused(pair, tmp_path, edit, named):
    folder, *_ = pair
    with pytest.raises(ConfigError, match=named):
        foveal.load(str(_edited(folder, tmp_path, edit, file="preprocessor_config.json")))


# ---- pan-and-scan ------------------------------------------------------------------------------
# transformers' Gemma3Processor passes its own images_kwargs defaults (off, 256 px, 4 crops, ratio 1.2) over the
# image processor's saved values, so its reference is asked for the saved values explicitly
PAN_AND_SCAN = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=16, pan_and_scan_max_num_crops=4,
                    pan_and_scan_min_ratio_to_activate=1.2)


@pytest.fixture(scope="module")
def pan_and_scan(pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3-pas") / "model"
    shutil.copytree(pair[0], folder)
    d = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(d | PAN_AND_SCAN))
    return foveal.load(str(folder), dtype="float32"), pair[2], pair[3]


def _hf_pas_inputs(processor, messages):
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", processor_kwargs=PAN_AND_SCAN)


@pytest.mark.parametrize("sizes, views", [([(333, 57)], [5]), ([(57, 333)], [5]), ([(50, 37)], [3]),
                                          ([(90, 90)], [1]), ([(100, 60), (64, 200)], [3, 4])])
def test_pan_and_scan_crops_prompt_and_logits_match_transformers(pan_and_scan, sizes, views):
    """Wide, tall, barely wide (2 crops), square (none) and two images: pixel values, the prompt with HF's
    "Here is the original image ... crops" text, the image-token layout and the logits."""
    ours, hf, processor = pan_and_scan
    messages = _ask("What is in this image?", *(_image(s, i) for i, s in enumerate(sizes)))
    ref = _hf_pas_inputs(processor, messages)
    p = ours.processor.prepare(messages, ours.image_limits)
    pixels, counts = ours.processor.pixels(p.images)
    assert counts == views and torch.equal(pixels, ref["pixel_values"])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref["input_ids"][0].tolist()
    assert p.image_mask == ref["token_type_ids"][0].bool().tolist()
    assert (views[0] > 1) == ("and here are some crops to help you see better" in ours.tokenizer.decode(ids))
    assert [c.n_tokens for c in p.images] == [4 * v for v in views] == [ours.image_tokens((h, w)) for w, h in sizes]
    assert ours.count_tokens(messages) == len(ids)
    assert (logits - _hf_logits(hf, ref)).abs().max().item() <= 1e-4


def test_pan_and_scan_greedy_tokens_match_transformers(pan_and_scan):
    ours, hf, processor = pan_and_scan
    messages = _ask("Describe the picture in detail.", _image((333, 57), 4))
    r = _greedy(ours, messages)
    assert r.token_ids == _hf_greedy(hf, _hf_pas_inputs(processor, messages))
    assert r.stats.image_tokens == 20
    d = ours.describe()
    assert d["pan_and_scan"] is True and d["max_image_tokens"] == 20


def test_pan_and_scan_settings_left_null_keep_it_off(pair, tmp_path):
    """The hub's preprocessor configs hold nulls: Gemma3Processor's defaults, pan-and-scan off."""
    folder, *_ = pair
    ours = foveal.load(str(_edited(folder, tmp_path, lambda d: d.update(
        do_pan_and_scan=None, pan_and_scan_min_crop_size=None, pan_and_scan_max_num_crops=None,
        pan_and_scan_min_ratio_to_activate=None), file="preprocessor_config.json")), dtype="float32")
    assert ours.describe()["pan_and_scan"] is False and ours.image_tokens((57, 333)) == 4
