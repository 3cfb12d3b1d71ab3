"""Idefics3 and SmolVLM through the family seam: the whole model against transformers.

Tiny random checkpoints saved by save_pretrained (tests/tiny.py): 32-px tiles of 4 tokens each, images
resized to a 96-px (Idefics3) or 64-px (SmolVLM) longest edge. The prompt ids and pixel tensors come from
transformers' own Idefics3Processor / SmolVLMProcessor and the logits from Idefics3ForConditionalGeneration /
SmolVLMForConditionalGeneration, in float32.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import foveal
from foveal.errors import ConfigError, PromptError
from foveal.models.families.idefics3.image_processing import Idefics3ImageConfig, grid
from tiny import build_idefics3, hf_idefics3, hf_idefics3_processor
from tiny import ask as _ask, random_image as _image

LONGEST = {"idefics3": 96, "smolvlm": 64}
# tall, wide, smaller than a tile (grown to the longest edge like every image), square
SIZES = [(40, 150), (200, 50), (20, 24), (64, 64)]      # (width, height)


@pytest.fixture(scope="module", params=list(LONGEST))
def pair(request, tmp_path_factory):
    kind = request.param
    folder = build_idefics3(tmp_path_factory.mktemp(kind), kind=kind, longest_edge=LONGEST[kind])
    return kind, folder, foveal.load(str(folder), dtype="float32"), hf_idefics3(folder), hf_idefics3_processor(folder)


def _hf_inputs(processor, messages, images):
    parts = [[{"type": "image"} if p["type"] == "image" else p for p in m["content"]]
             if isinstance(m["content"], list) else m["content"] for m in messages]
    hf_messages = [{"role": m["role"], "content": c} for m, c in zip(messages, parts)]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[images] if images else None, return_tensors="pt")


def _check_pixels(ours, messages, ref_inputs):
    chunks = ours.processor.prepare(messages, ours.image_limits).images
    frames, masks, counts = ours.processor.pixels(chunks)
    assert torch.equal(frames, ref_inputs["pixel_values"][0])
    assert torch.equal(masks, ref_inputs["pixel_attention_mask"][0].bool())
    assert sum(counts) == frames.shape[0]


@pytest.mark.parametrize("size", SIZES)
def test_prompt_logits_and_pixels_match_transformers(pair, size):
    kind, _, ours, hf, processor = pair
    image = _image(size)
    messages = _ask("What is in this image?", image)
    ref_inputs = _hf_inputs(processor, messages, [image])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    _check_pixels(ours, messages, ref_inputs)
    with torch.no_grad():
        ref = hf(**ref_inputs).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4
    assert ours.count_tokens(messages) == len(ids)
    n_image = ref_inputs["input_ids"][0].eq(ours.config.image_token_id).sum().item()
    assert ours.image_tokens((size[1], size[0])) == n_image


def test_the_token_layout_is_hfs_tiles_rows_and_global_view(pair):
    kind, _, ours, _, processor = pair
    messages = _ask("Hi", _image((200, 50)))
    rows, cols = grid(50, 200, ours.processor.image_config)
    assert (rows, cols) == ((1, 3) if kind == "idefics3" else (1, 2))
    text = ours.processor.prompt.tokenizer.decode(ours.prompt_logits(messages)[0], skip_special_tokens=False)
    tile = "<image>" * 4
    expected = "".join(f"<fake_token_around_image><row_1_col_{c + 1}>{tile}" for c in range(cols)) + \
        f"\n\n<fake_token_around_image><global-img>{tile}<fake_token_around_image>"
    assert expected in text


def test_two_images_and_a_multi_turn_chat(pair):
    kind, _, ours, hf, processor = pair
    a, b, c = _image((100, 60), 1), _image((30, 200), 2), _image((90, 90), 3)
    messages = [{"role": "system", "content": "You answer briefly."},
                *_ask("Compare these.", a, b),
                {"role": "assistant", "content": "The first is wider."},
                *_ask("And this one?", c)]
    ref_inputs = _hf_inputs(processor, messages, [a, b, c])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    _check_pixels(ours, messages, ref_inputs)
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
        again = ours.generate(messages, max_tokens=32, temperature=0.0)    # from the cached prefix
    finally:
        ours.engine.eos_ids = eos
    assert r.token_ids == ref.tolist()
    assert again.token_ids == r.token_ids and again.stats.cached_tokens > 0
    assert r.stats.images == 1 and r.stats.image_tokens == ref_inputs["input_ids"][0].eq(
        ours.config.image_token_id).sum().item()


def test_text_only_prompt(pair):
    kind, _, ours, hf, processor = pair
    messages = [{"role": "user", "content": "hello world"}]
    ref_inputs = _hf_inputs(processor, messages, [])
    ids, logits = ours.prompt_logits(messages)
    assert ids == ref_inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = hf(**ref_inputs).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4


def test_the_tower_honours_a_padded_frame_as_transformers_does(pair):
    """Frames are never padded by the processor (each is one tile square), but the tower takes HF's
    pixel_attention_mask: a frame with its bottom-right padded, and one smaller than image_size."""
    kind, _, ours, hf, _ = pair
    g = torch.Generator().manual_seed(9)
    frames = torch.randn(2, 3, 32, 32, generator=g)
    mask = torch.ones(2, 32, 32, dtype=torch.long)
    mask[0, 20:, :] = 0
    mask[0, :, 12:] = 0
    frames[0] *= mask[0]
    with torch.no_grad():
        ref = hf.model.get_image_features(frames[None], mask[None]).pooler_output[0]
        got = torch.cat(ours.model.encode((frames, mask.bool(), [2])))
        assert (got - ref).abs().max().item() <= 1e-4
        small = torch.randn(1, 3, 16, 16, generator=g)
        ref = hf.model.get_image_features(small[None]).pooler_output[0]
        got = ours.model.encode((small, torch.ones(1, 16, 16, dtype=torch.bool), [1]))[0]
        assert (got - ref).abs().max().item() <= 1e-4


def test_info_and_image_tokens(pair):
    kind, _, ours, _, _ = pair
    d = ours.describe()
    assert d["family"] == "idefics3" and d["layout"] == kind and d["image_tokens_per_image"] == 4
    side = LONGEST[kind] // 32
    assert d["max_image_tokens"] == 4 * (side * side + 1) == ours.image_tokens((500, 500))
    assert ours.parameter_counts()["vision"] > 0 and ours.parameter_counts()["projector"] > 0


def test_a_budget_is_kept_or_refused(pair):
    _, _, ours, _, _ = pair
    messages = _ask("What?", _image((100, 60)))
    n = ours.image_tokens((60, 100))
    assert ours.generate(messages, max_tokens=1, max_image_tokens=n).stats.image_tokens == n
    with pytest.raises(PromptError, match="outside the request's image-token budget"):
        ours.generate(messages, max_tokens=1, max_image_tokens=n - 1)


# ---- bad configs: each a clear error -----------------------------------------------------------
def _edited(folder, tmp_path, edit, file="config.json"):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    d = json.loads((out / file).read_text())
    edit(d)
    (out / file).write_text(json.dumps(d))
    return out


def test_image_token_that_is_not_the_tokenizers_is_refused(pair, tmp_path):
    _, folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d.update(image_token_id=7))
    with pytest.raises(ConfigError, match="image_token_id 7 is not the tokenizer's <image>"):
        foveal.load(str(bad))


def test_scale_factor_that_does_not_divide_the_grid_is_refused(pair, tmp_path):
    _, folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d.update(scale_factor=3))
    with pytest.raises(ConfigError, match="scale_factor 3 does not divide the 4x4 patch grid"):
        foveal.load(str(bad))


def test_image_seq_len_that_disagrees_with_the_model_is_refused(pair, tmp_path):
    _, folder, *_ = pair
    bad = _edited(folder, tmp_path, lambda d: d.update(image_seq_len=9), file="processor_config.json")
    with pytest.raises(ConfigError, match="image_seq_len 9 differs from the 4 tokens"):
        foveal.load(str(bad))


def test_processor_config_reads_hf_keys():
    cfg = Idefics3ImageConfig.from_hf({"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512},
                                       "do_image_splitting": False, "resample": 3})
    assert (cfg.longest_edge, cfg.tile, cfg.do_image_splitting, cfg.resample) == (2048, 512, False, 3)
    assert grid(1000, 3000, cfg) == (0, 0)
    with pytest.raises(ConfigError, match="size.longest_edge must be a positive integer"):
        Idefics3ImageConfig.from_hf({"size": {"longest_edge": 0}})


def test_a_tied_head_matches_transformers(tmp_path):
    folder = build_idefics3(tmp_path / "tied", kind="smolvlm", tie=True, longest_edge=64)
    ours, hf, processor = foveal.load(str(folder), dtype="float32"), hf_idefics3(folder), hf_idefics3_processor(folder)
    assert ours.model.lm_head.weight is ours.model.language_model.embed_tokens.weight
    image = _image((120, 80), 5)
    messages = _ask("hi", image)
    ref_inputs = _hf_inputs(processor, messages, [image])
    with torch.no_grad():
        ref = hf(**ref_inputs).logits[0]
    assert (ours.prompt_logits(messages)[1] - ref).abs().max().item() <= 1e-4
