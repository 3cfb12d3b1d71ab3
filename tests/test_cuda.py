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
