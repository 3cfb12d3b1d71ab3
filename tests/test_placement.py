"""--gpu-layers: one model split between an accelerator and the CPU (models/placement.py).

No GPU here (nor in CI), so the accelerator is played by PyTorch's "meta" device: tensors there
have shapes and devices but no values, and an elementwise op that mixes a meta and a CPU tensor
raises. The real load path runs with it; hooks check that every layer receives its input on its
own device and that the CPU layers compute exactly what the unsplit model does. test_cuda.py runs
the same split on a real GPU where there is one.
"""

import pytest
import torch

import foveal
import foveal.api
import tiny
from foveal.cli import main as cli_main
from foveal.errors import ConfigError
from foveal.models.placement import check_gpu_layers, device_of

TEXT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.build_llava(tmp_path_factory.mktemp("split"), tie=True)


@pytest.fixture
def meta_is_a_device(monkeypatch):
    real = foveal.api.resolve_device
    monkeypatch.setattr(foveal.api, "resolve_device", lambda d: "meta" if d == "meta" else real(d))


def layer_inputs(vlm):
    """Record (device of each decoder layer's input, its output) during forwards."""
    seen = []
    for i, layer in enumerate(vlm.model.language_model.layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: seen.append((i, args[0].device, out)))
    return seen


def test_the_last_layers_head_and_vision_go_on_the_accelerator(folder, meta_is_a_device):
    vlm = foveal.load(folder, device="meta", dtype="float32", gpu_layers=1)
    m = vlm.model
    n = vlm.config.text.num_hidden_layers
    assert n >= 2
    for name, p in list(m.named_parameters()) + list(m.named_buffers()):
        want = "cpu" if (name.startswith("language_model.embed_tokens.") or name == "language_model.inv_freq"
                         or any(name.startswith(f"language_model.layers.{i}.") for i in range(n - 1))) else "meta"
        assert p.device.type == want, name
    # the tied head got its own copy beside the last layer; the embedding stayed on the CPU
    assert m.lm_head.weight.device.type == "meta" and m.language_model.embed_tokens.weight.device.type == "cpu"
    assert m.input_device.type == "cpu" and m.vision_device.type == "meta"


def test_a_split_forward_crosses_once_and_the_cpu_layers_are_unchanged(folder, meta_is_a_device):
    whole = foveal.load(folder, dtype="float32")
    split = foveal.load(folder, device="meta", dtype="float32", gpu_layers=1)
    ref_seen, seen = layer_inputs(whole), layer_inputs(split)
    ids, ref = whole.prompt_logits(TEXT)
    ids2, logits = split.prompt_logits(TEXT)
    assert ids2 == ids and logits.device.type == "meta" and logits.shape == ref.shape
    n = split.config.text.num_hidden_layers
    assert [(i, d.type) for i, d, _ in seen] == [(i, "cpu" if i < n - 1 else "meta") for i in range(n)]
    for (i, _, out), (_, _, ref_out) in zip(seen[:n - 1], ref_seen[:n - 1]):
        assert torch.equal(out, ref_out), f"CPU layer {i} changed"
    caches = [layer.self_attn.kv_cache for layer in split.model.language_model.layers]
    assert [c.k.device.type for c in caches] == ["cpu"] * (n - 1) + ["meta"]
    assert 0 < split.weight_bytes("cpu") < whole.weight_bytes("cpu") == whole.weight_bytes()   # what /api/ps and
    assert whole.weight_bytes("cuda") == 0                                                     # info report


def test_quantized_layers_made_on_the_cpu_move_to_the_accelerator(folder, meta_is_a_device):
    vlm = foveal.load(folder, device="meta", dtype="float32", quant="int8", gpu_layers=1)
    n = vlm.config.text.num_hidden_layers
    last = vlm.model.language_model.layers[n - 1].mlp.down_proj
    first = vlm.model.language_model.layers[0].mlp.down_proj
    assert type(last).__name__ == "Int8Linear" and last.weight.device.type == "meta"
    assert first.weight.device.type == "cpu"


def test_all_layers_or_more_is_the_whole_model_on_the_device(folder, meta_is_a_device):
    vlm = foveal.load(folder, device="meta", dtype="float32", gpu_layers=99)
    assert vlm.model.input_device.type == "meta"      # no split: the embedding goes too


def test_device_of_names():
    assert device_of("language_model.embed_tokens.weight", 24, 20, "cuda") == "cpu"
    assert device_of("language_model.layers.3.mlp.up_proj.weight", 24, 20, "cuda") == "cpu"
    assert device_of("language_model.layers.4.mlp.up_proj.weight", 24, 20, "cuda") == "cuda"
    assert device_of("lm_head.weight", 24, 0, "cuda") == "cuda"
    assert device_of("vision_tower.embeddings.patch_embedding.weight", 24, 0, "cuda") == "cuda"
    assert device_of("language_model.layers.23.self_attn.kv_cache.k", 24, 0, "cuda") == "cpu"


@pytest.mark.parametrize("value,device,match", [
    (-1, "cuda", "integer >= 0"), (True, "cuda", "integer >= 0"), (2.5, "cuda", "integer >= 0"),
    ("8", "cuda", "integer >= 0"), (4, "cpu", "needs device='cuda'"),
])
def test_nonsensical_gpu_layers_are_refused(value, device, match):
    with pytest.raises(ConfigError, match=match):
        check_gpu_layers(value, device, 24)


def test_gpu_layers_on_the_cpu_is_refused_by_load_and_cli(folder, capsys):
    with pytest.raises(ConfigError, match="needs device='cuda'"):
        foveal.load(folder, gpu_layers=1)
    assert cli_main(["run", str(folder), "--gpu-layers", "1", "hello"]) != 0
    assert "needs device='cuda'" in capsys.readouterr().err
