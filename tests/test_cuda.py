"""The same model on a CUDA GPU agrees with the CPU (skipped where there is no GPU, as in CI)."""

import pytest
import torch
from PIL import Image

import foveal
import tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_cuda_matches_cpu(tmp_path):
    folder = tiny.build_llava(tmp_path / "m")
    messages = [foveal.user("What is this?", images=[Image.new("RGB", (40, 30), (0, 120, 255))])]
    cpu = foveal.load(folder, dtype="float32")
    gpu = foveal.load(folder, device="cuda", dtype="float32")
    ids_cpu, logits_cpu = cpu.prompt_logits(messages)
    ids_gpu, logits_gpu = gpu.prompt_logits(messages)
    assert ids_cpu == ids_gpu
    assert (logits_cpu - logits_gpu.cpu()).abs().max().item() <= 1e-3
    assert gpu.generate(messages, max_tokens=8).token_ids == cpu.generate(messages, max_tokens=8).token_ids
    for dtype in ("bfloat16", "float16"):
        r = foveal.load(folder, device="cuda", dtype=dtype).generate(messages, max_tokens=8)
        assert r.stats.generated_tokens >= 1


def test_gpu_layers_split_matches_cpu(tmp_path):
    """--gpu-layers 1: the first decoder layer and the embedding on the CPU, the rest on the GPU."""
    folder = tiny.build_llava(tmp_path / "m", tie=True)
    messages = [foveal.user("What is this?", images=[Image.new("RGB", (40, 30), (0, 120, 255))])]
    cpu = foveal.load(folder, dtype="float32")
    split = foveal.load(folder, device="cuda", dtype="float32", gpu_layers=1)
    assert split.model.input_device.type == "cpu" and split.model.lm_head.weight.device.type == "cuda"
    _, logits_cpu = cpu.prompt_logits(messages)
    _, logits_split = split.prompt_logits(messages)
    assert (logits_cpu - logits_split.cpu()).abs().max().item() <= 1e-3
    assert split.generate(messages, max_tokens=8).token_ids == cpu.generate(messages, max_tokens=8).token_ids
    for quant in ("int8", "int4"):
        r = foveal.load(folder, device="cuda", dtype="bfloat16", quant=quant, gpu_layers=1).generate(messages,
                                                                                                   max_tokens=8)
        assert r.stats.generated_tokens >= 1
