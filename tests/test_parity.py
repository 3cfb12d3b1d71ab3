"""foveal against transformers (the reference implementation) on tiny real checkpoints.

float32 throughout: logits over the whole prompt within 1e-4, greedy generation token-identical
for 32 tokens, token ids equal to the HF processor's, pixel values equal to its image processor's.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import foveal
import tiny

CASES = {
    # name: build_llava kwargs
    "clip-llama-untied-L-2-default-legacy": dict(vision="clip", text="llama", tie=False, feature_layer=-2,
                                                 strategy="default", layout="legacy"),
    "siglip-qwen2-tied-L-1-full-v5": dict(vision="siglip", text="qwen2", tie=True, feature_layer=-1,
                                          strategy="full", layout="v5"),
    "clip-mistral-layers[-3,-1]-saved": dict(vision="clip", text="mistral", feature_layer=[-3, -1],
                                             strategy="default", layout="saved"),
    "clip-llama-rope-llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "clip-llama-rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "clip-llama-rope-dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


def photo(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.int32)
    img = np.clip(img + rng.integers(-40, 40, img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    folder = tiny.build_llava(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    return request.param, foveal.load(folder, dtype="float32"), tiny.hf_model(folder), tiny.hf_processor(folder)


def conversation(images, text="What is in this image? Describe it."):
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
             + [{"type": "text", "text": text}]}]


def hf_inputs(processor, images, text="What is in this image? Describe it."):
    return processor.apply_chat_template(conversation(images, text), add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_and_ids_match_transformers(pair, n_images):
    name, vlm, hf, processor = pair
    images = [photo(45, 37, 1), photo(20, 61, 2)][:n_images]
    inputs = hf_inputs(processor, images)
    ids, logits = vlm.prompt_logits(conversation(images))
    assert ids == inputs["input_ids"][0].tolist(), "token ids differ from the HF processor's"
    with torch.no_grad():
        ref = hf(**inputs).logits[0]
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() <= 1e-4, name


def test_greedy_generation_matches_transformers(pair):
    name, vlm, hf, processor = pair
    images = [photo(50, 40, 3)]
    inputs = hf_inputs(processor, images, "Tell me a story.")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=32, do_sample=False)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(vlm.engine.eos_ids)
    ref = ref[:next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    ours = vlm.generate(conversation(images, "Tell me a story."), max_tokens=32)
    assert ours.token_ids == ref, name


def test_pixels_match_hf_image_processor(pair):
    name, vlm, hf, processor = pair
    from foveal.processing.images import preprocess
    for w, h in [(45, 37), (17, 100), (333, 101)]:
        img = photo(w, h, w)
        ref = processor.image_processor(img, return_tensors="pt")["pixel_values"][0]
        assert (preprocess(img, vlm.image_config) - ref).abs().max().item() <= 1e-5


def test_image_features_match(pair):
    name, vlm, hf, processor = pair
    pixels = processor.image_processor([photo(40, 40, 5)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=pixels).pooler_output
        ref = torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref
        ours = vlm.model.encode_images(pixels)
    assert ours.shape[1] == vlm.image_tokens_per_image
    assert (ours - ref.reshape(ours.shape)).abs().max().item() <= 1e-5


def test_kv_cache_decoding_equals_full_recompute(pair):
    """Logits of each generated token from the cached decode equal a fresh full-prompt pass."""
    name, vlm, hf, processor = pair
    messages = conversation([photo(30, 30, 7)], "Count.")
    result = vlm.generate(messages, max_tokens=6)
    ids, _ = vlm.prompt_logits(messages)
    full = ids + result.token_ids[:-1]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([full]), pixel_values=processor.image_processor(
            [photo(30, 30, 7)], return_tensors="pt")["pixel_values"]).logits[0]
    greedy = ref[len(ids) - 1:].argmax(-1).tolist()
    assert greedy == result.token_ids
