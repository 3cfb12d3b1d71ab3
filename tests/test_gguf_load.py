"""foveal.load on GGUF files (a text model + mmproj, as llama.cpp / Ollama / LM Studio keep them)."""

import subprocess
import sys

import pytest
from PIL import Image

import foveal
import tiny
from foveal.weights.gguf import read_hf_folder, write_gguf

IMG = Image.new("RGB", (40, 30), (250, 120, 10))


@pytest.fixture(scope="module", params=["clip-llama", "siglip-qwen2"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    vision, text = request.param.split("-")
    folder = tiny.build_llava(root / "hf", vision=vision, text=text, tie=text == "qwen2",
                              feature_layer=-2 if vision == "clip" else -1,
                              strategy="default" if vision == "clip" else "full")
    model, mmproj = write_gguf(read_hf_folder(folder), root / "gguf", type="f32")
    return folder, model, mmproj


def test_gguf_f32_logits_equal_safetensors(exported):
    folder, model, mmproj = exported
    messages = [foveal.user("What is in the picture?", images=[IMG])]
    ids_a, logits_a = foveal.load(folder, dtype="float32").prompt_logits(messages)
    gguf = foveal.load(model, mmproj=mmproj, dtype="float32")
    ids_b, logits_b = gguf.prompt_logits(messages)
    assert ids_a == ids_b
    assert (logits_a - logits_b).abs().max().item() <= 1e-3
    assert gguf.generate(messages, max_tokens=12).token_ids == \
        foveal.load(folder, dtype="float32").generate(messages, max_tokens=12).token_ids


def test_gguf_folder_pairs_model_and_mmproj(exported):
    folder, model, mmproj = exported
    vlm = foveal.load(model.parent, dtype="float32")
    assert vlm.config.vision is not None and vlm.image_tokens_per_image > 0


def test_load_from_an_ollama_store(exported, tmp_path, monkeypatch):
    folder, model, mmproj = exported
    store = tiny.ollama_store(tmp_path / "ollama", "tinyllava", "latest", [(model, "model"), (mmproj, "projector")])
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    vlm = foveal.load("ollama:tinyllava", dtype="float32")
    ref = foveal.load(folder, dtype="float32")
    messages = [foveal.user("Name it.", images=[IMG])]
    assert vlm.generate(messages, max_tokens=8).token_ids == ref.generate(messages, max_tokens=8).token_ids


def test_cli_export_writes_loadable_gguf(exported, tmp_path):
    folder, _, _ = exported
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "foveal.cli", "export", str(folder), "--gguf", str(out),
                        "--type", "q8_0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.glob("*.gguf"))
    assert len(files) == 2 and any("mmproj" in f for f in files)
    vlm = foveal.load(out, dtype="float32")
    assert vlm.generate([foveal.user("Hi", images=[IMG])], max_tokens=4).stats.generated_tokens >= 1


@pytest.mark.parametrize("quant", [None, "int8"])
def test_gguf_load_converts_one_linear_weight_at_a_time(exported, monkeypatch, quant):
    """Issue: loading must not hold more than one full-precision copy of a tensor at a time. With
    quant=, a GGUF's layer weights are dequantized when the loader takes them, and each is dropped
    (quantized) before the next is converted: the whole model never exists in full precision."""
    import weakref

    import torch
    from foveal.weights.gguf import GGUFFile
    folder, model, mmproj = exported
    original = GGUFFile.tensor
    alive: list = []            # weak references to the layer weights converted so far
    peak = [0]

    def spy(self, name, dtype, row_order=None):
        out = original(self, name, dtype, row_order)
        if name.startswith("blk.") and name.endswith(".weight") and out.dim() == 2:
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            alive.append(weakref.ref(out))
        return out
    monkeypatch.setattr(GGUFFile, "tensor", spy)
    vlm = foveal.load(model, mmproj=mmproj, dtype="float32", quant=quant)
    n_layer_weights = 7 * vlm.config.text.num_hidden_layers
    assert len(alive) == n_layer_weights
    if quant:
        assert peak[0] == 0                      # each was quantized and freed before the next
    else:
        assert peak[0] == n_layer_weights - 1    # float32: the model keeps every one
    with torch.inference_mode():
        assert vlm.generate([foveal.user("Hi", images=[IMG])], max_tokens=3).token_ids
