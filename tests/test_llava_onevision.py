"""LLaVA-OneVision against transformers' LlavaOnevisionForConditionalGeneration and its PIL processor.

A tiny checkpoint saved by save_pretrained (tiny.build_llava_onevision): 30-px SigLIP tiles in 7-px patches
(4x4 features, the conv floors as on the real 384/14 tower), pinpoints up to 3x3 tiles and anyres_max_4, so
a big image's 12x12 feature grid is downscaled. float32: token ids and pixel values equal to HF's processor,
logits within 1e-4, greedy tokens identical.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import foveal
import tiny
from foveal.errors import ConfigError, UnsupportedModelError
from test_parity import conversation, photo

# (w, h): tall (3x1 tiles), wide (1x3), smaller than a tile (1x1), big (3x3: past the budget, downscaled)
SIZES = {"tall": (40, 150), "wide": (150, 40), "small": (20, 20), "big": (200, 180)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build_llava_onevision(tmp_path_factory.mktemp("llava-onevision"))


@pytest.fixture(scope="module")
def models(folder):
    return (foveal.load(folder, dtype="float32"), tiny.hf_llava_onevision(folder),
            tiny.hf_llava_onevision_processor(folder))


def hf_inputs(processor, messages):
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def check_against_hf(vlm, hf, processor, messages):
    inputs = hf_inputs(processor, messages)
    ids, logits = vlm.prompt_logits(messages)
    assert ids == inputs["input_ids"][0].tolist(), "token ids (the image token counts) differ from HF's"
    with torch.no_grad():
        ref = hf(**inputs).logits[0]
    diff = (logits - ref).abs().max().item()
    assert diff <= 1e-4, diff
    return inputs


@pytest.mark.parametrize("name", list(SIZES))
def test_one_image_logits_ids_and_pixels_match_transformers(models, name):
    vlm, hf, processor = models
    w, h = SIZES[name]
    img = photo(w, h, 1)
    inputs = check_against_hf(vlm, hf, processor, conversation([img]))
    n = vlm.config.image_tokens((h, w))
    assert int((inputs["input_ids"] == hf.config.image_token_id).sum()) == n
    views = vlm.processor.views(img)
    assert views.shape == inputs["pixel_values"][0].shape        # base view + every tile, nothing padded
    assert torch.equal(views, inputs["pixel_values"][0])
    lay = vlm.config.image_layout((h, w))
    assert ((lay.rows, lay.cols) != lay.tiles.unpadded) == (name == "big")   # only the big one is downscaled
    if name == "small":
        assert lay.tiles.tiles == (1, 1)


def test_downscaled_features_equal_hf_pack_image_features(models):
    vlm, hf, processor = models
    img = photo(*SIZES["big"], 4)
    inputs = processor.image_processor([img], return_tensors="pt")
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                          batch_num_images=inputs["batch_num_images"]).pooler_output[0]
        ours = vlm.model.encode_image(vlm.processor.views(img), (180, 200))
    assert ours.shape == ref.shape == (vlm.config.image_tokens((180, 200)), 64)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_two_images_take_one_padded_view_each(models):
    """HF's batch_num_images: an image among several is not tiled (a mean-colour square, base + newline)."""
    vlm, hf, processor = models
    images = [photo(45, 37, 1), photo(20, 61, 2)]
    inputs = check_against_hf(vlm, hf, processor, conversation(images))
    assert inputs["pixel_values"].shape[:2] == (2, 1)
    for i, img in enumerate(images):
        assert torch.equal(vlm.processor.views(img, tiled=False), inputs["pixel_values"][i])
    assert int((inputs["input_ids"] == hf.config.image_token_id).sum()) == 2 * (16 + 1)


def test_multi_turn_chat(models):
    """A second image in a later turn makes both untiled; the answer in between is plain text."""
    vlm, hf, processor = models
    a, b = photo(*SIZES["wide"], 3), photo(*SIZES["tall"], 5)
    first = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "What is this?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A red circle and a blue square."}]}]
    check_against_hf(vlm, hf, processor, first + [{"role": "user", "content": [{"type": "text", "text": "Count."}]}])
    check_against_hf(vlm, hf, processor, first + [
        {"role": "user", "content": [{"type": "image", "image": b}, {"type": "text", "text": "And this one?"}]}])


def test_greedy_generation_matches_transformers(models):
    vlm, hf, processor = models
    messages = conversation([photo(*SIZES["big"], 6)], "Tell me a story.")
    inputs = hf_inputs(processor, messages)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=32, do_sample=False)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    ref = ref[:next((i for i, t in enumerate(ref) if t in vlm.engine.eos_ids), len(ref))]
    result = vlm.generate(messages, max_tokens=32)
    assert result.token_ids == ref and len(ref) > 8
    assert result.stats.image_tokens == vlm.config.image_tokens((180, 200))


def test_token_counts_match_the_hf_processor(models):
    """The count comes from the size alone, equal to HF's for many sizes; max_image_tokens bounds them all."""
    vlm, hf, processor = models
    rng = np.random.default_rng(0)
    sizes = [(int(a), int(b)) for a, b in rng.integers(8, 400, size=(300, 2))] + [(8, 8), (1000, 8), (8, 1000)]
    ref = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    ours = [vlm.image_tokens(s) for s in sizes]
    assert ours == ref
    assert max(ours) <= vlm.max_image_tokens and vlm.image_tokens_per_image == 17


def test_an_image_alone_and_among_others_are_cached_apart(models):
    """One picture has two embeddings (tiled alone, one view among several): the cache keeps them apart."""
    vlm, hf, processor = models
    a, b = photo(60, 50, 8), photo(30, 70, 9)
    vlm.unload()
    alone = vlm.generate(conversation([a], "Count."), max_tokens=3)
    both = conversation([a, b])
    check_against_hf(vlm, hf, processor, both)          # after the tiled embedding of `a` was cached
    assert vlm.count_tokens(both) == len(hf_inputs(processor, both)["input_ids"][0])
    keys = list(vlm.engine.image_cache)
    assert len(keys) == 3 and sum(k.startswith(keys[0][:64]) for k in keys) == 2    # `a` twice, `b` once
    again = vlm.generate(conversation([a], "Count."), max_tokens=3)
    assert again.token_ids == alone.token_ids


def test_plan_and_info(folder, models):
    from foveal.plan import plan
    vlm, hf, processor = models
    p = plan(str(folder), device="cpu", memory="8GiB", ctx=512, images=1)
    assert p.image_tokens_per_image == vlm.max_image_tokens
    assert any("OneVision" in n for n in p.notes)
    d = vlm.describe()
    assert d["vision_aspect_ratio"] == "anyres_max_4" and d["image_grid_pinpoints"] == tiny.ONEVISION_PINPOINTS


def test_bad_configs_are_refused_by_name(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((folder / "config.json").read_text())
    cases = [({"vision_aspect_ratio": "anyres"}, ConfigError, "vision_aspect_ratio 'anyres'"),
             ({"vision_aspect_ratio": "anyres_max_0"}, ConfigError, "anyres_max_N"),
             ({"image_grid_pinpoints": [[45, 30]]}, ConfigError, "not a grid"),
             ({"image_grid_pinpoints": [[30, 60], [60, 30]]}, ConfigError, "differ from config.json"),
             ({"vision_feature_select_strategy": "default"}, UnsupportedModelError, "4x4 grid"),
             ({"vision_feature_layer": -9}, ConfigError, "vision_feature_layer -9")]
    for change, error, message in cases:
        (bad / "config.json").write_text(json.dumps(cfg | change))
        with pytest.raises(error, match=message):
            foveal.load(bad, dtype="float32")
    (bad / "config.json").write_text(json.dumps(cfg | {"vision_aspect_ratio": "anyres_max_9"}))
    with pytest.raises(ConfigError, match="processor_config.json vision_aspect_ratio"):
        foveal.load(bad, dtype="float32")
    (bad / "config.json").write_text(json.dumps(cfg))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    (bad / "preprocessor_config.json").write_text(json.dumps(pre | {"size": {"height": 32, "width": 32}}))
    with pytest.raises(ConfigError, match="30x30 px tiles"):
        foveal.load(bad, dtype="float32")
    with pytest.raises(ConfigError, match="does not apply to a LLaVA-OneVision"):
        foveal.load(folder, dtype="float32", image_mode="pad")


def test_video_is_refused_by_name(models):
    vlm, hf, processor = models
    with pytest.raises(foveal.errors.PromptError, match="does not take video"):
        vlm.generate([{"role": "user", "content": [{"type": "video", "video": [photo(30, 30, 1)] * 2},
                                                   {"type": "text", "text": "hi"}]}], max_tokens=2)


def test_counts_at_the_real_geometry_match_hf():
    """The shipped geometry (36 pinpoints of 384-px tiles, 27x27 features from 14-px patches, anyres_max_9):
    counts equal LlavaOnevisionProcessor's arithmetic, and max_image_tokens bounds every one, though the
    most comes from a grid trimmed to just within the budget, not from a pinpoint."""
    import types
    from transformers import LlavaOnevisionProcessor as P
    from foveal.models.families import llava_onevision as ov
    cfg = ov.config({"model_type": "llava_onevision", "text_config": {"model_type": "qwen2"}})
    hf = types.SimpleNamespace(image_processor=types.SimpleNamespace(
        image_grid_pinpoints=[list(p) for p in ov.ONEVISION_PINPOINTS]), num_image_tokens=729,
        vision_aspect_ratio="anyres_max_9")
    hf._get_unpadded_features = types.MethodType(P._get_unpadded_features, hf)
    rng = np.random.default_rng(1)
    sizes = [(int(a), int(b)) for a, b in rng.integers(8, 4000, size=(500, 2))] + [(2304, 720), (384, 384)]
    ours = [cfg.image_tokens(s) for s in sizes]
    assert ours == [P._get_number_of_features(hf, h, w, 384, 384) for h, w in sizes]
    assert max(ours) <= cfg.max_image_tokens == 8829 > max(cfg.image_tokens(p) for p in ov.ONEVISION_PINPOINTS)
