"""Checkpoint loading: every name layout, sharding, the original LLaVA layout with a separate CLIP
tower, and a clear WeightsError (naming file and tensor) for each way a checkpoint can be broken.

One tiny llava-hf checkpoint is built with transformers per module; every other case is derived
from it on disk (renamed, sharded, truncated, edited), so the file stays fast.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import foveal
import tiny
from foveal.config import config_from_hf, load_config_file
from foveal.errors import WeightsError
from foveal.models.vlm import VisionLanguageModel
from foveal.weights.safetensors import canonical_name, load_into, open_checkpoint

SRC = Path(foveal.__file__).resolve().parents[1]


# ---- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """CLIP (3 layers, feature layer -2) + Llama, untied, as this transformers' save_pretrained writes it."""
    return tiny.build_llava(tmp_path_factory.mktemp("w") / "saved", vision="clip", text="llama", tie=False,
                            feature_layer=-2, strategy="default", layout="saved")


@pytest.fixture(scope="module")
def variants(saved, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("variants")
    out = {"saved": saved}
    for name, layout, sharded in [("legacy", "legacy", False), ("v5", "v5", False),
                                  ("saved-sharded", None, True), ("v5-sharded", "v5", True)]:
        folder = base / name
        shutil.copytree(saved, folder)
        if layout:
            tiny.rename_layout(folder, layout)
        if sharded:
            tiny.shard(folder, n=3)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def hf(saved):
    return tiny.hf_model(saved)


@pytest.fixture
def broken(saved, tmp_path) -> Path:
    """A fresh copy of the saved checkpoint for a test to damage."""
    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    return folder


def pixels(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def load_f32(folder: Path, **kw) -> foveal.VLM:
    return foveal.load(folder, dtype="float32", **kw)


# ---- layouts -------------------------------------------------------------------------------
def test_layouts_load_identical_tensors(variants):
    reference = None
    for name, folder in variants.items():
        if "sharded" in name:
            assert (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists()
        vlm = load_f32(folder)
        sd = {k: v for k, v in vlm.model.state_dict().items() if ".kv_cache." not in k}
        if reference is None:
            reference = sd
            continue
        assert sd.keys() == reference.keys(), name
        for k in sd:
            assert torch.equal(sd[k], reference[k]), f"{name}: {k}"


def test_loaded_tensors_are_the_checkpoints(saved, hf):
    """Every parameter foveal holds equals the HF model's tensor of the same role."""
    ours = load_f32(saved).model.state_dict()
    theirs = hf.state_dict()
    pairs = {"lm_head.weight": "lm_head.weight",
             "language_model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
             "language_model.layers.1.self_attn.k_proj.weight": "model.language_model.layers.1.self_attn.k_proj.weight",
             "vision_tower.embeddings.class_embedding": "model.vision_tower.vision_model.embeddings.class_embedding",
             "vision_tower.pre_layrnorm.weight": "model.vision_tower.vision_model.pre_layrnorm.weight",
             "vision_tower.encoder.layers.1.mlp.fc2.weight": "model.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight",
             "multi_modal_projector.linear_2.weight": "model.multi_modal_projector.linear_2.weight"}
    theirs = {k.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)
              if k.startswith("model.vision_tower.") and ".vision_model." not in k else k: v
              for k, v in theirs.items()}
    for ours_name, hf_name in pairs.items():
        assert torch.equal(ours[ours_name], theirs[hf_name]), ours_name


@pytest.mark.parametrize("stored,canonical", [
    ("language_model.model.layers.0.mlp.up_proj.weight", "language_model.layers.0.mlp.up_proj.weight"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias", "vision_tower.encoder.layers.0.mlp.fc1.bias"),
    ("vision_tower.encoder.layers.0.mlp.fc1.bias", "vision_tower.encoder.layers.0.mlp.fc1.bias"),
    ("model.language_model.norm.weight", "language_model.norm.weight"),
    ("model.vision_tower.vision_model.pre_layrnorm.bias", "vision_tower.pre_layrnorm.bias"),
    ("model.multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
    ("model.image_newline", "image_newline"),
    ("model.layers.3.self_attn.q_proj.bias", "language_model.layers.3.self_attn.q_proj.bias"),
    ("model.embed_tokens.weight", "language_model.embed_tokens.weight"),
    ("model.norm.weight", "language_model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.mm_projector.0.weight", "multi_modal_projector.linear_1.weight"),
    ("model.mm_projector.2.bias", "multi_modal_projector.linear_2.bias"),
    ("model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
     "vision_tower.embeddings.patch_embedding.weight"),
    ("vision_model.post_layernorm.weight", "vision_tower.post_layernorm.weight"),
])
def test_canonical_names(stored, canonical):
    assert canonical_name(stored) == canonical


def test_unused_tensors_are_reported_not_errors(saved):
    """post_layernorm and the tower layer past feature layer -2 are never run: unused, not an error."""
    cfg = config_from_hf(load_config_file(saved / "config.json"))
    sources = open_checkpoint(saved)
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
    unused = load_into(model, sources, torch.float32)
    assert len(model.vision_tower.encoder.layers) == 2            # 3-layer tower, feature layer -2
    assert "vision_tower.post_layernorm.weight" in unused and "vision_tower.post_layernorm.bias" in unused
    layer2 = [u for u in unused if u.startswith("vision_tower.encoder.layers.2.")]
    assert len(layer2) == 16                                       # 4 linears + 2 norms, weight and bias
    assert set(unused) == {"vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias", *layer2}
    assert not any(p.is_meta for p in model.parameters())
    load_f32(saved)                                                # and the public loader accepts it


def test_siglip_qwen2_tied_unused_head(tmp_path):
    """A tied checkpoint has no lm_head; SigLIP's pooling head and post_layernorm are unused."""
    folder = tiny.build_llava(tmp_path / "sq", vision="siglip", text="qwen2", tie=True, feature_layer=-1,
                              strategy="full", layout="v5")
    names = header(folder / "model.safetensors")[1].keys()
    assert not any(n.endswith("lm_head.weight") for n in names)
    cfg = config_from_hf(load_config_file(folder / "config.json"))
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
    unused = load_into(model, open_checkpoint(folder), torch.float32, optional={"lm_head.weight"})
    assert unused and all(".head." in u or "post_layernorm" in u for u in unused), unused
    vlm = load_f32(folder)
    assert vlm.model.lm_head.weight is vlm.model.language_model.embed_tokens.weight


def test_bfloat16_from_float32_checkpoint(saved):
    vlm = foveal.load(saved, dtype="bfloat16")
    ref = load_f32(saved)
    for (name, p), q in zip(vlm.model.named_parameters(), ref.model.parameters()):
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, q.to(torch.bfloat16)), name


# ---- broken checkpoints ---------------------------------------------------------------------
def test_truncated_file(broken):
    path = broken / "model.safetensors"
    n, head = header(path)
    size = path.stat().st_size - 100
    os.truncate(path, size)
    cut = {name for name, e in head.items() if name != "__metadata__" and 8 + n + e["data_offsets"][1] > size}
    assert cut
    with pytest.raises(WeightsError) as info:
        load_f32(broken)
    msg = str(info.value)
    assert str(path) in msg and "truncated" in msg
    assert any(repr(name) in msg for name in cut), msg


def test_truncated_inside_header(broken):
    path = broken / "model.safetensors"
    os.truncate(path, 50)
    with pytest.raises(WeightsError, match="truncated") as info:
        load_f32(broken)
    assert str(path) in str(info.value)
    os.truncate(path, 3)
    with pytest.raises(WeightsError, match="too short") as info:
        load_f32(broken)
    assert str(path) in str(info.value)


def test_garbage_file(broken):
    path = broken / "model.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError) as info:
        load_f32(broken)
    assert str(path) in str(info.value)


def test_header_length_larger_than_file(broken):
    path = broken / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    with pytest.raises(WeightsError, match="header claims") as info:
        load_f32(broken)
    assert str(path) in str(info.value)


def test_header_not_json(broken):
    path = broken / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:40] = b"\xff" * 32
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="not valid JSON") as info:
        load_f32(broken)
    assert str(path) in str(info.value)


def test_header_entry_lies_about_size(broken):
    path = broken / "model.safetensors"
    raw = path.read_bytes()
    n, head = header(path)
    name = "multi_modal_projector.linear_1.weight"
    head[name]["shape"] = [head[name]["shape"][0] + 1, head[name]["shape"][1]]
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (n - len(text))                                   # keep the data offsets valid
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    with pytest.raises(WeightsError, match="needs .* bytes") as info:
        load_f32(broken)
    assert str(path) in str(info.value) and repr(name) in str(info.value)


def test_missing_tensor(broken):
    path = broken / "model.safetensors"
    sd = load_file(path)
    del sd["language_model.model.layers.1.mlp.down_proj.weight"]
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="lacks") as info:
        load_f32(broken)
    msg = str(info.value)
    assert "layers.1.mlp.down_proj.weight" in msg and str(path) in msg


def test_missing_head_of_untied_model(broken):
    path = broken / "model.safetensors"
    sd = load_file(path)
    del sd["language_model.lm_head.weight"]
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="lm_head.weight"):
        load_f32(broken)


def test_wrong_shape(broken):
    path = broken / "model.safetensors"
    sd = load_file(path)
    name = "multi_modal_projector.linear_1.weight"
    good = list(sd[name].shape)
    sd[name] = torch.zeros(good[0], good[1] - 1)
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(WeightsError) as info:
        load_f32(broken)
    msg = str(info.value)
    assert repr(name) in msg and str(path) in msg
    assert str([good[0], good[1] - 1]) in msg and str(good) in msg


def test_pickle_checkpoint_refused(saved, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(saved / f, folder / f)
    marker = tmp_path / "unpickled"

    class Payload:      # a pickle that would leave a marker file behind if anything unpickled it
        def __reduce__(self):
            return (Path.touch, (marker,))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(WeightsError) as info:
        load_f32(folder)
    msg = str(info.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg
    assert not marker.exists()


def test_empty_folder_with_config(saved, tmp_path):
    folder = tmp_path / "nothing"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(saved / f, folder / f)
    with pytest.raises(WeightsError, match="no .safetensors files") as info:
        load_f32(folder)
    assert str(folder) in str(info.value)


def test_missing_shard(variants, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(variants["saved-sharded"], folder)
    gone = "model-00002-of-00003.safetensors"
    (folder / gone).unlink()
    with pytest.raises(WeightsError, match="not on disk") as info:
        load_f32(folder)
    assert gone in str(info.value) and "model.safetensors.index.json" in str(info.value)


def test_bad_index(variants, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(variants["saved-sharded"], folder)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(WeightsError, match="weight_map") as info:
        load_f32(folder)
    assert "model.safetensors.index.json" in str(info.value)


def test_truncated_shard_named(variants, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(variants["saved-sharded"], folder)
    shard = folder / "model-00003-of-00003.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(WeightsError, match="truncated") as info:
        load_f32(folder)
    assert str(shard) in str(info.value)


# ---- the original LLaVA repo layout with a separate CLIP tower -------------------------------
@pytest.fixture(scope="module")
def original(saved, hf, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The saved llava-hf model rewritten as an original-LLaVA folder, plus its CLIP tower twice: as
    CLIPVisionModel.save_pretrained writes it here (unprefixed names) and as a full CLIPModel
    checkpoint like openai/clip-vit-large-patch14-336 (`vision_model.*`, `text_model.*`, CLIPConfig)."""
    from transformers import CLIPConfig, CLIPVisionModel
    base = tmp_path_factory.mktemp("original")
    hf_cfg = json.loads((saved / "config.json").read_text())
    sd = hf.state_dict()

    tower = base / "clip-tower"
    clip = CLIPVisionModel(hf.config.vision_config).eval()
    prefix = "model.vision_tower."
    tower_sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    tower_sd = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in tower_sd.items()}
    clip.load_state_dict(tower_sd, strict=True)
    clip.save_pretrained(tower)

    full = base / "clip-full"
    full.mkdir()
    vision = hf.config.vision_config.to_dict()
    clip_cfg = CLIPConfig(vision_config=vision, text_config=dict(hidden_size=16, intermediate_size=32,
                                                                 num_hidden_layers=1, num_attention_heads=2),
                          projection_dim=16)
    (full / "config.json").write_text(clip_cfg.to_json_string())
    full_sd = {"vision_model." + k: v.contiguous() for k, v in tower_sd.items()}
    full_sd |= {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 16),
                "visual_projection.weight": torch.zeros(16, 32), "logit_scale": torch.tensor(2.6592)}
    save_file(full_sd, full / "model.safetensors", metadata={"format": "pt"})

    folder = base / "llava-v1.5-tiny"
    folder.mkdir()
    text = hf_cfg["text_config"]
    config = {k: v for k, v in text.items() if k not in ("architectures", "dtype", "torch_dtype")} | {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": hf.config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "use_mm_proj": True}
    (folder / "config.json").write_text(json.dumps(config))
    renames = {"model.language_model.": "model.", "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
               "model.multi_modal_projector.linear_2.": "model.mm_projector.2.", "lm_head.": "lm_head."}
    lm = {}
    for k, v in sd.items():
        for old, new in renames.items():
            if k.startswith(old):
                lm[new + k[len(old):]] = v.contiguous()
    assert "model.mm_projector.0.weight" in lm and "model.embed_tokens.weight" in lm and "lm_head.weight" in lm
    assert not any("vision" in k for k in lm)
    save_file(lm, folder / "model.safetensors", metadata={"format": "pt"})
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(saved / f, folder / f)
    return folder, tower, full


@pytest.mark.parametrize("which", ["clip-vision-model", "full-clip-model"])
def test_original_layout_matches_llava_hf(which, original, saved, hf):
    folder, tower, full = original
    orig = load_f32(folder, vision_tower=tower if which == "clip-vision-model" else full)
    ref = load_f32(saved)
    assert orig.config.layout == "original" and orig.config.vision is not None
    assert orig.image_tokens_per_image == ref.image_tokens_per_image == 16
    assert orig.image_config.mode == "pad"                     # image_aspect_ratio "pad" in the config
    x = pixels()
    with torch.inference_mode():
        feats = orig.model.encode_images(x)
        feats_ref = ref.model.encode_images(x)
        feats_hf = torch.stack(hf.model.get_image_features(pixel_values=x, vision_feature_layer=-2,
                                                           vision_feature_select_strategy="default").pooler_output)
    assert feats.shape == (2, 16, hf.config.text_config.hidden_size)
    assert torch.equal(feats, feats_ref)
    assert (feats - feats_hf).abs().max() <= 1e-5

    ids = torch.tensor([[1, 10, 57, 200, 33, 7, 99, 150, 3, 42]])
    pos = torch.arange(ids.shape[1])
    with torch.inference_mode():
        logits = orig.model(orig.model.embed(ids), pos)
        logits_ref = ref.model(ref.model.embed(ids), pos)
        logits_hf = hf(input_ids=ids).logits
    assert torch.equal(logits, logits_ref)
    assert (logits - logits_hf).abs().max() <= 1e-4


def test_original_layout_generates(original):
    folder, tower, _ = original
    vlm = load_f32(folder, vision_tower=tower)
    from PIL import Image
    img = Image.new("RGB", (40, 24), (200, 30, 30))
    result = vlm.generate([{"role": "user", "content": [{"type": "image", "image": img},
                                                        {"type": "text", "text": "What is this?"}]}],
                          max_tokens=4)
    assert result.stats.image_tokens == 16 and result.stats.generated_tokens >= 1


def test_original_layout_needs_its_tower(original, tmp_path):
    folder, _, _ = original
    with pytest.raises(foveal.errors.ModelNotFoundError, match="clip-vit-large-patch14-336") as info:
        load_f32(folder, vision_tower=tmp_path / "nowhere")
    assert "vision_tower" in str(info.value)


# ---- memory while loading ---------------------------------------------------------------
RSS_PROBE = textwrap.dedent("""
    import json, sys
    import os, torch, foveal
    if os.environ.get("FOVEAL_TEST_WARM_META"):      # diagnosis only: pay torch's one-time meta-init imports first
        torch.empty(1, device="meta").normal_()
    from foveal.plan import peak_rss      # VmHWM: ru_maxrss would report the pytest parent's peak (1.2 GiB)
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    baseline = rss()
    vlm = foveal.load(sys.argv[1], dtype=sys.argv[2])
    loaded_peak = peak_rss()
    with torch.no_grad():           # touch every weight: a lazily mapped model must not cost twice either
        for p in vlm.model.parameters():
            p.sum()
    touched_peak = peak_rss()
    print(json.dumps(dict(baseline=baseline, loaded_peak=loaded_peak, touched_peak=touched_peak,
                          weights=vlm.weight_bytes())))
""")
BUILD_BIG = textwrap.dedent("""
    import sys
    from foveal.bundled import build_random_model, random_config
    cfg = random_config()
    t = cfg.text
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 1024, 2816, 4
    t.num_attention_heads, t.num_key_value_heads, t.head_dim = 16, 8, 64
    v = cfg.vision
    v.hidden_size, v.intermediate_size, v.num_hidden_layers = 256, 1024, 4
    cfg.projector.in_features, cfg.projector.out_features = v.hidden_size, t.hidden_size
    build_random_model(sys.argv[1], cfg=cfg)
""")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_while_loading(dtype, tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "rss-model"
    env = dict(os.environ, PYTHONPATH=str(SRC))
    if not (folder / "model.safetensors").exists():
        subprocess.run([sys.executable, "-c", BUILD_BIG, str(folder)], check=True, env=env)
    file_bytes = (folder / "model.safetensors").stat().st_size
    assert file_bytes > 150e6
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(folder), dtype], check=True, env=env,
                         capture_output=True, text=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    load_ratio = (m["loaded_peak"] - m["baseline"]) / m["weights"]
    touched_ratio = (m["touched_peak"] - m["baseline"]) / m["weights"]
    print(f"\n{dtype}: file {file_bytes / 2**20:.0f} MiB, weights {m['weights'] / 2**20:.0f} MiB, "
          f"peak-baseline while loading {(m['loaded_peak'] - m['baseline']) / 2**20:.0f} MiB ({load_ratio:.2f}x), "
          f"after touching every weight {(m['touched_peak'] - m['baseline']) / 2**20:.0f} MiB ({touched_ratio:.2f}x)")
    # (a fixed ~70 MiB here once came from torch importing its meta-registrations on the first
    # normal_() of a meta tensor; FOVEAL_TEST_WARM_META=1 pays it before the baseline to tell them apart)
    assert load_ratio <= 1.3, f"peak RSS while loading is {load_ratio:.2f}x the weights"
    assert touched_ratio <= 1.3, f"peak RSS after reading every weight is {touched_ratio:.2f}x the weights"


def test_original_layout_linear_projector(original, tmp_path):
    """LLaVA v1's single-Linear projector (`mm_projector_type: linear`, `model.mm_projector.weight`)."""
    folder, tower, _ = original
    linear = tmp_path / "llava-linear"
    shutil.copytree(folder, linear)
    cfg = json.loads((linear / "config.json").read_text()) | {"mm_projector_type": "linear"}
    (linear / "config.json").write_text(json.dumps(cfg))
    sd = load_file(linear / "model.safetensors")
    sd = {k: v for k, v in sd.items() if not k.startswith("model.mm_projector.")}
    torch.manual_seed(3)
    w, b = torch.randn(cfg["hidden_size"], cfg["mm_hidden_size"]), torch.randn(cfg["hidden_size"])
    sd |= {"model.mm_projector.weight": w, "model.mm_projector.bias": b}
    save_file(sd, linear / "model.safetensors", metadata={"format": "pt"})
    vlm = load_f32(linear, vision_tower=tower)
    assert vlm.config.projector.kind == "linear"
    x = pixels()
    with torch.inference_mode():
        features = vlm.model.image_features(x)
        assert torch.allclose(vlm.model.encode_images(x), torch.nn.functional.linear(features, w, b))
