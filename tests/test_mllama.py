"""Mllama (Llama 3.2 Vision) through the family seam: the whole model against transformers.

A tiny random checkpoint saved by save_pretrained (tests/tiny.py: 28-px tiles, up to 4 of them, a local and
a gated global ViT, a 4-layer Llama decoder with cross-attention at layers 1 and 3, every gate non-zero);
the prompt ids, pixels, aspect-ratio ids / mask and cross-attention mask come from transformers' own
MllamaProcessor (over MllamaImageProcessorPil, what AutoImageProcessor picks without torchvision), the
logits and greedy tokens from MllamaForConditionalGeneration, in float32.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import foveal
from foveal.errors import ConfigError
from foveal.models import registry
from foveal.models.families import mllama
from foveal.models.families.mllama.family import dense_cross_attention_mask
from tiny import build_mllama, hf_mllama, hf_mllama_processor
from tiny import ask as _ask, random_image as _image

# (width, height): odd sizes; 20x30 lies below one tile (grows), 300x50 wide (4 across), 57x333 tall
SIZES = [(70, 45), (20, 30), (300, 50), (57, 333)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = build_mllama(tmp_path_factory.mktemp("mllama"))
    return folder, foveal.load(str(folder), dtype="float32"), hf_mllama(folder), hf_mllama_processor(folder)


def _hf_inputs(processor, messages, images):
    parts = [[{"type": "image"} if p["type"] == "image" else p for p in m["content"]]
             if isinstance(m["content"], list) else m["content"] for m in messages]
    hf_messages = [{"role": m["role"], "content": c} for m, c in zip(messages, parts)]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    # the rendered text carries its BOS already (apply_chat_template(tokenize=True) adds none either)
    return processor(text=[text], images=[images] if images else None, return_tensors="pt", add_special_tokens=False)


def _hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(**inputs).logits[0]


def _hf_greedy(hf, inputs, n):
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _our_inputs(ours, messages):
    """Our pixels, aspect-ratio ids / mask (as HF's, batch of one) and cross-attention mask of a prompt."""
    p = ours.processor.prepare(messages, ours.image_limits)
    pixels, ratio_ids, ratio_mask = ours.processor.pixels(p.images)
    counts = ratio_mask.sum(-1).tolist()
    slots = [i for i, m in enumerate(p.image_mask) if m]
    dense = dense_cross_attention_mask(slots, counts, len(p.input_ids), ours.config.vision.max_num_tiles)
    return pixels[None], ratio_ids[None], ratio_mask[None], dense[None].long()


def _check_inputs(ours, messages, ref):
    pixels, ratio_ids, ratio_mask, cross = _our_inputs(ours, messages)
    assert torch.equal(pixels, ref["pixel_values"])
    assert torch.equal(ratio_ids, ref["aspect_ratio_ids"]) and torch.equal(ratio_mask, ref["aspect_ratio_mask"])
    assert torch.equal(cross, ref["cross_attention_mask"])


def test_the_image_processor_is_mllamas_pil_one(pair):
    *_, processor = pair
    assert type(processor.image_processor).__name__ == "MllamaImageProcessorPil"
    assert processor.image_processor.max_image_tiles == 4


@pytest.mark.parametrize("size", SIZES)
def test_prompt_logits_and_inputs_match_transformers(pair, size):
    _, ours, hf, processor = pair
    image = _image(size)
    messages = _ask("What is in this image?", image)
    ref = _hf_inputs(processor, messages, [image])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref["input_ids"][0].tolist()
    _check_inputs(ours, messages, ref)
    assert (logits - _hf_logits(hf, ref)).abs().max().item() <= 1e-4
    assert ours.count_tokens(messages) == len(ids)


def test_the_images_matter_even_to_the_text_before_them(pair):
    """The parity is not vacuous: another image moves the logits, also of the tokens before the image (HF's
    all-zero mask rows attend uniformly to every tile)."""
    _, ours, *_ = pair
    _, a = ours.prompt_logits(_ask("What?", _image((70, 45), seed=1)))
    _, b = ours.prompt_logits(_ask("What?", _image((70, 45), seed=2)))
    assert (a[:3] - b[:3]).abs().max().item() > 1e-3 and (a[-1] - b[-1]).abs().max().item() > 1e-3


def test_two_images_and_a_text_only_prompt(pair):
    _, ours, hf, processor = pair
    one, two = _image((90, 60), seed=3), _image((40, 120), seed=4)
    messages = [{"role": "user", "content": [{"type": "image", "image": one}, {"type": "text", "text": "this one"},
                                             {"type": "image", "image": two}, {"type": "text", "text": "and that?"}]}]
    ref = _hf_inputs(processor, messages, [one, two])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref["input_ids"][0].tolist()
    _check_inputs(ours, messages, ref)
    assert (logits - _hf_logits(hf, ref)).abs().max().item() <= 1e-4
    text = [{"role": "user", "content": "Hello there"}]
    ref = _hf_inputs(processor, text, [])
    ids, logits = ours.prompt_logits(text)
    assert ids == ref["input_ids"][0].tolist()
    assert (logits - _hf_logits(hf, ref)).abs().max().item() <= 1e-4


def test_consecutive_images_attend_together_as_the_hf_processor_says():
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)
    ids = [5, 9, 9, 5, 5, 9, 5, 5, 9, 9, 9, 5]
    slots, counts = [i for i, t in enumerate(ids) if t == 9], [1, 4, 2, 3, 1, 2]
    ref = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, 9)], [counts], 4, len(ids))
    assert torch.equal(dense_cross_attention_mask(slots, counts, len(ids), 4)[None].long(), torch.from_numpy(ref))


def test_32_greedy_tokens_match_transformers(pair):
    _, ours, hf, processor = pair
    image = _image((57, 333), seed=5)
    messages = _ask("Describe the picture in detail.", image)
    ours.engine.reset()
    got = ours.generate(messages, max_tokens=32, temperature=0.0).token_ids
    assert got == _hf_greedy(hf, _hf_inputs(processor, messages, [image]), 32)[:len(got)]
    assert len(got) == 32 or len(_hf_greedy(hf, _hf_inputs(processor, messages, [image]), 32)) == len(got) + 1


def test_a_second_turn_that_adds_an_image_matches_transformers(pair):
    """Turn 2 reuses turn 1's prefix in the engine; its new image changes what the text before the first
    image attends to, so the model prefills again from slot 0: the tokens are HF's on the whole prompt."""
    _, ours, hf, processor = pair
    one, two = _image((70, 45), seed=6), _image((45, 70), seed=7)
    first = _ask("What is this?", one)
    ours.engine.reset()
    answer = ours.generate(first, max_tokens=6, temperature=0.0)
    follow = first + [{"role": "assistant", "content": answer.text},
                      {"role": "user", "content": [{"type": "image", "image": two},
                                                   {"type": "text", "text": "And this one?"}]}]
    cached = ours.generate(follow, max_tokens=12, temperature=0.0)
    assert cached.stats.cached_tokens > 0
    ref = _hf_inputs(processor, follow, [one, two])
    assert cached.token_ids == _hf_greedy(hf, ref, 12)[:len(cached.token_ids)]
    same = follow + [{"role": "assistant", "content": cached.text}, {"role": "user", "content": "Sure?"}]
    again = ours.generate(same, max_tokens=6, temperature=0.0)       # same images: only the new tokens
    assert again.stats.cached_tokens > len(ours.processor.prepare(follow, ours.image_limits).input_ids)
    assert again.token_ids == _hf_greedy(hf, _hf_inputs(processor, same, [one, two]), 6)[:len(again.token_ids)]
    _, logits = ours.prompt_logits(follow)
    assert (logits - _hf_logits(hf, ref)).abs().max().item() <= 1e-4


def test_cross_attention_keys_and_values_are_computed_once_per_image_set(pair):
    _, ours, *_ = pair
    layers = ours.model.language_model.cross()
    calls = []
    hooks = [proj.register_forward_hook(lambda m, i, o: calls.append(m))
             for layer in layers for proj in (layer.cross_attn.k_proj, layer.cross_attn.v_proj)]
    try:
        ours.engine.reset()
        messages = _ask("Describe it.", _image((80, 50), seed=8))
        r = ours.generate(messages, max_tokens=17, temperature=0.0)
        assert r.stats.generated_tokens == 17            # the prefill's token and 16 decode steps
        assert len(calls) == 2 * len(layers)            # once per layer at the prefill, none in 16 decode steps
        follow = messages + [{"role": "assistant", "content": r.text}, {"role": "user", "content": "More?"}]
        assert ours.generate(follow, max_tokens=4, temperature=0.0).stats.cached_tokens > 0
        assert len(calls) == 2 * len(layers)            # the same image on a prefix-reuse hit: kept
        ours.generate(_ask("Describe it.", _image((80, 50), seed=9)), max_tokens=4, temperature=0.0)
        assert len(calls) == 4 * len(layers)            # another image: computed again
    finally:
        for h in hooks:
            h.remove()


def test_decode_steps_attend_as_the_last_prompt_token(pair):
    """16 decode steps through the engine give the logits of the whole sequence prefilled at once."""
    _, ours, *_ = pair
    messages = _ask("Describe it.", _image((60, 90), seed=10))
    ours.engine.reset()
    r = ours.generate(messages, max_tokens=16, temperature=0.0)
    p = ours.processor.prepare(messages, ours.image_limits)
    embeds = ours.engine.image_embeds(p.images, ours.processor, foveal.Stats())
    full = ours.engine.prompt_logits(p.input_ids + r.token_ids[:-1], p.image_mask + [False] * (len(r.token_ids) - 1),
                                     embeds)
    picks = full[len(p.input_ids) - 1:].argmax(-1).tolist()
    assert picks == r.token_ids


def test_registry_and_describe(pair):
    folder, ours, *_ = pair
    raw = json.loads((folder / "config.json").read_text())
    assert registry.family_name(raw) == "mllama" and registry.ARCHITECTURES[raw["architectures"][0]] == "mllama"
    d = ours.describe()
    assert d["family"] == "mllama" and d["cross_attention_layers"] == [1, 3] and ours.image_tokens((60, 90)) == 1
    assert [type(layer).__name__ for layer in ours.model.language_model.layers] == [
        "DecoderLayer", "CrossAttentionDecoderLayer", "DecoderLayer", "CrossAttentionDecoderLayer"]


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["text_config"].update(cross_attention_layers=[0, 2]), "cross_attention_layers"),
    (lambda c: c["text_config"].update(cross_attention_layers=[1, 9]), "cross_attention_layers"),
    (lambda c: c["vision_config"].update(vision_output_dim=100), "vision_output_dim"),
    (lambda c: c["vision_config"].update(intermediate_layers_indices=[0, 7]), "intermediate_layers_indices"),
    (lambda c: c.update(image_token_index=10 ** 6), "image_token_index"),
    (lambda c: c.update(model_type="llava"), "model_type"),
])
def test_bad_configs_are_refused_by_name(pair, edit, match):
    folder, *_ = pair
    raw = json.loads((folder / "config.json").read_text())
    edit(raw)
    with pytest.raises(ConfigError, match=match):
        mllama.config(raw)


def test_a_processor_that_disagrees_with_the_vision_model_is_refused(pair, tmp_path):
    folder, *_ = pair
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    pre = json.loads((bad / "preprocessor_config.json").read_text())
    pre["max_image_tiles"] = 2
    (bad / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ConfigError, match="max_image_tiles"):
        foveal.load(str(bad), dtype="float32")
