"""Memory planning: the arithmetic on a known config, bad options, the CLI, `check_fits`, and the
plan against the measured peak RSS of real runs (three model sizes x two dtypes, each in a fresh
process; about two minutes, so marked slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from foveal.cli import main
from foveal.config import ProjectorConfig, TextConfig, VisionConfig, VLMConfig
from foveal.errors import ConfigError, ContextLengthError, FovealError, MemoryBudgetError
from foveal.plan import GiB, MiB, parse_size, plan

# llava-hf/llava-1.5-7b-hf's config.json (the keys that matter; the rest are HF defaults)
LLAVA_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096,
                    "rms_norm_eps": 1e-5, "torch_dtype": "float16"},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                      "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768},
}


@pytest.fixture
def llava7b(tmp_path):
    path = tmp_path / "llava-1.5-7b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAVA_7B))
    return path


def test_llava_7b_arithmetic(llava7b):
    p = plan(llava7b, dtype="float16", ctx=4096, images=1, memory="24GiB")
    assert p.image_tokens_per_image == 576
    assert round(p.parameters["language_model"] / 1e9, 2) == 6.74
    assert p.parameters["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert p.kv_per_token == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    assert p.kv_cache == 4096 * 512 * 1024 == 2 * GiB
    assert p.lm_weights == p.parameters["language_model"] * 2
    assert p.head == p.embedding == 32064 * 4096 * 2            # untied: both counted
    assert p.total == p.weights + p.kv_cache + p.activations + p.overhead
    assert p.fits and p.margin == 24 * GiB - p.total
    # the parts scale as they should
    assert plan(llava7b, dtype="float16", ctx=2048, memory="24GiB").kv_cache == GiB
    assert plan(llava7b, dtype="float32", ctx=4096, memory="24GiB").kv_cache == 4 * GiB
    assert plan(llava7b, dtype="float16", images=2).vision_activations == 2 * p.vision_activations


def test_quantized_sizes(llava7b):
    f16 = plan(llava7b, dtype="bfloat16", quant="none")
    int8 = plan(llava7b, dtype="bfloat16", quant="int8")
    int4 = plan(llava7b, dtype="bfloat16", quant="int4")
    # 1 byte per weight + a bf16 scale per output row; 0.5 byte + scale and zero per 64 inputs
    assert int8.layers / f16.layers == pytest.approx(0.5, rel=0.01)
    assert int4.layers / f16.layers == pytest.approx(0.25 + 2 / 64, rel=0.01)
    assert int8.embedding == f16.embedding                       # the embedding is not quantized
    assert int8.head == 32064 * 4096 + 32064 * 2
    assert int8.vision == f16.vision and int4.projector == f16.projector
    assert int4.quant == "int4-g64" and plan(llava7b, dtype="bfloat16", quant="int4-g128").layers < int4.layers


def test_quantizing_at_load_peaks_one_float_layer_above_the_weights(llava7b):
    int8 = plan(llava7b, dtype="float16", quant="int8", memory="12GiB", ctx=1024)
    f16 = plan(llava7b, dtype="float16")
    head = 32064 * 4096                                             # the largest quantized matrix
    # + the head in float16 + 3 float32 temporaries of the largest 4096-row block (down_proj: 4096 x 11008)
    assert int8.load_peak == int8.overhead + int8.weights + 2 * head + 3 * 4 * 4096 * 11008
    assert int8.load_peak < int8.weights + f16.lm_weights        # never the float LM and its copy at once
    assert int8.peak == max(int8.total, int8.load_peak) and int8.margin == 12 * GiB - int8.peak
    assert "load peak" in int8.report()                             # a short context: the load is the peak
    # a checkpoint saved quantized loads without the float copy, and is planned as saved
    saved = plan(LLAVA_7B | {"quantization": {"method": "foveal", "mode": "int8", "modules": {}}}, dtype="float16")
    assert saved.load_peak == 0 and saved.lm_weights == int8.lm_weights and saved.quant == "int8"
    with pytest.raises(ConfigError, match="already quantized"):
        plan(LLAVA_7B | {"quantization": {"method": "foveal", "mode": "int8", "modules": {}}}, quant="int4")


def test_tied_head_counted_once_unless_quantized():
    text = TextConfig(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      tie_word_embeddings=True, attention_bias=True)
    cfg = VLMConfig(text=text, layout="text")
    p = plan(cfg, dtype="float32", ctx=256, images=0)
    assert p.head == 0 and p.embedding == 1000 * 64 * 4 and p.image_tokens_per_image == 0
    q = plan(cfg, dtype="float32", ctx=256, quant="int8")
    assert q.embedding == p.embedding and q.head == 1000 * 64 + 1000 * 4


def test_gpu_layers_suggestion(llava7b):
    p = plan(llava7b, device="cuda", memory="8GiB", dtype="float16")
    assert p.fits is False and 0 < p.gpu_layers < 32
    used = (p.vision + p.projector + p.head + p.activations + p.overhead
            + p.gpu_layers * (p.layer_bytes + p.kv_cache // 32))
    assert used <= 8 * GiB < used + p.layer_bytes + p.kv_cache // 32
    assert f"--gpu-layers {p.gpu_layers}" in p.report()
    assert plan(llava7b, device="cuda", memory="40GiB", dtype="float16").gpu_layers is None
    assert plan(llava7b, device="cuda", memory="1GiB", dtype="float16").gpu_layers == 0


def test_parse_size():
    assert parse_size("8GiB") == 8 * GiB == parse_size("8G") == parse_size("8 gib")
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("512MiB") == 512 * MiB and parse_size("1.5GiB") == int(1.5 * GiB)
    assert parse_size(1000) == 1000


@pytest.mark.parametrize("kwargs, words", [
    ({"memory": "lots"}, "memory size 'lots' is not understood"),
    ({"memory": "-1GiB"}, "not understood"),
    ({"memory": "0"}, "must be positive"),
    ({"ctx": 0}, "ctx must be a positive"),
    ({"quant": "int3"}, "quant='int3' is not supported"),
    ({"dtype": "int8"}, "dtype 'int8' is not supported"),
    ({"device": "tpu"}, "device 'tpu' is not supported"),
    ({"images": -1}, "images must be"),
])
def test_bad_options(llava7b, kwargs, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")):
        plan(llava7b, **kwargs)


def test_images_beyond_context(llava7b):
    with pytest.raises(ContextLengthError, match="needs 1153 tokens but the context holds 1024"):
        plan(llava7b, ctx=1024, images=2)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        plan(tmp_path)


def test_cli(llava7b, capsys):
    assert main(["plan", str(llava7b.parent), "--memory", "8GiB", "--quant", "int4", "--ctx", "2048",
                 "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    for words in ("vision weights", "projector", "LM layers", "KV cache", "activations", "runtime overhead",
                  "576 tokens", "verdict: fits in 8.00 GiB"):
        assert words in out
    assert main(["plan", str(llava7b), "--device", "cuda", "--memory", "8GiB", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is False and d["gpu_layers"] > 0 and d["kv_per_token"] == 512 * 1024
    for argv, words in ((["--memory", "lots"], "memory size 'lots'"), (["--ctx", "0"], "ctx must be"),
                        (["--quant", "int3"], "int3")):
        assert main(["plan", str(llava7b), *argv]) == 1
        assert words in capsys.readouterr().err


# ---- check_fits on a loaded model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    import foveal
    from foveal.bundled import build_random_model
    folder = build_random_model(tmp_path_factory.mktemp("plan") / "tiny")
    return foveal.load(folder, dtype="float32", context_length=512)


def test_check_fits(tiny_vlm):
    from foveal.plan import check_fits
    check_fits(tiny_vlm, 100, 64, images=1)                            # plenty of memory here
    with pytest.raises(ContextLengthError, match="needs 513 tokens but the context holds 512"):
        check_fits(tiny_vlm, 512, 1)
    with pytest.raises(MemoryBudgetError, match="needs .* MiB more memory but only 0 MiB") as e:
        check_fits(tiny_vlm, 100, 64, images=1, available=1000)
    assert isinstance(e.value, FovealError) and e.value.available == 1000 and e.value.needed > 1000


# ---- the plan against measured peak RSS -------------------------------------------------------------
RUN = textwrap.dedent("""
    import json, sys
    from PIL import Image
    import foveal
    from foveal.plan import peak_rss
    vlm = foveal.load(sys.argv[1], dtype=sys.argv[2], quant=sys.argv[4] if len(sys.argv) > 4 else None)
    image = Image.new("RGB", (300, 240), (200, 30, 30))
    r = vlm.generate([{"role": "user", "content": [{"type": "image", "image": image},
                      {"type": "text", "text": "What is in this picture? Answer in detail."}]}],
                     max_tokens=int(sys.argv[3]))
    print(json.dumps({"rss": peak_rss(),      # this process's own peak (not pytest's, see peak_rss)
                      "cache_len": vlm.model.language_model.max_cache_len,
                      "weights": vlm.weight_bytes(), "prompt": r.stats.prompt_tokens}))
""")


def _config(hidden, layers, inter, vocab, vision_hidden, vision_layers) -> VLMConfig:
    vision = VisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                          num_hidden_layers=vision_layers, num_attention_heads=vision_hidden // 64,
                          image_size=224, patch_size=16)
    text = TextConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=[2], pad_token_id=3)
    return VLMConfig(text=text, vision=vision, image_token_id=4,
                     projector=ProjectorConfig(in_features=vision_hidden, out_features=hidden))


SIZES = {   # about 50, 150 and 400 MB of float32 weights
    "50MB": (384, 4, 1024, 8000, 256, 4),
    "150MB": (640, 6, 1792, 12000, 384, 4),
    "400MB": (768, 8, 2048, 16000, 512, 6),
}


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_matches_peak_rss(tmp_path, size, dtype):
    from foveal.bundled import build_random_model
    cfg = _config(*SIZES[size])
    folder = build_random_model(tmp_path / size, cfg=cfg)
    out = subprocess.run([sys.executable, "-c", RUN, str(folder), dtype, "200"], capture_output=True, text=True,
                         check=True, timeout=300)
    run = json.loads(out.stdout.strip().splitlines()[-1])
    p = plan(folder, ctx=run["cache_len"], images=1, dtype=dtype)
    assert p.weights == pytest.approx(run["weights"], abs=64 * 1024)      # + small buffers (RoPE)
    error = (p.total - run["rss"]) / run["rss"]
    print(f"{size} {dtype}: weights {run['weights'] / MiB:.0f} MiB, planned {p.total / MiB:.0f} MiB, "
          f"measured peak RSS {run['rss'] / MiB:.0f} MiB ({error:+.1%})")
    assert abs(error) <= 0.15


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_plan_matches_peak_rss_when_quantizing_at_load(tmp_path, quant):
    from foveal.bundled import build_random_model
    cfg = _config(*SIZES["400MB"])
    folder = build_random_model(tmp_path / "400MB", cfg=cfg)
    out = subprocess.run([sys.executable, "-c", RUN, str(folder), "bfloat16", "200", quant], capture_output=True,
                         text=True, check=True, timeout=300)
    run = json.loads(out.stdout.strip().splitlines()[-1])
    p = plan(folder, ctx=run["cache_len"], images=1, dtype="bfloat16", quant=quant)
    error = (p.peak - run["rss"]) / run["rss"]
    print(f"400MB {quant}: weights {run['weights'] / MiB:.0f} MiB, planned peak {p.peak / MiB:.0f} MiB, "
          f"measured peak RSS {run['rss'] / MiB:.0f} MiB ({error:+.1%})")
    assert abs(error) <= 0.15


@pytest.mark.slow
def test_measured_overhead_is_the_probe_process_own_peak():
    """measure_overhead() runs a fresh process; its figure must not include this (caller) process's
    peak, which Linux carries over exec in ru_maxrss."""
    from foveal.plan import CPU_OVERHEAD_BYTES, measure_overhead
    ballast = bytearray(600 * 2**20)        # the caller holds 600 MiB more than the probe ever needs
    ballast[::4096] = b"x" * len(ballast[::4096])
    assert measure_overhead("bfloat16") < CPU_OVERHEAD_BYTES * 1.3
