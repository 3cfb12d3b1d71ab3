"""Qwen2-VL / Qwen2.5-VL as llama.cpp stores them: a `qwen2vl` text model and a `clip` mmproj.

Mirrors llama.cpp's converter (conversion/qwenvl.py `Qwen2VLModel`, `Qwen2VLVisionModel`, the
keys of conversion/base.py `TextModel` / `MmprojModel`) and its readers (src/models/qwen2vl.cpp,
tools/mtmd/clip.cpp, clip-impl.h, tools/mtmd/models/qwen2vl.cpp), as vendored by
llama-cpp-python 0.3.36. `weights/gguf_read.py` / `gguf_write.py` call `read_gguf` / `write_gguf`
here for the `qwen2vl` architecture (models/registry.py `GGUF_ARCHITECTURES`).

Design decisions
- The decoder is qwen2's (same tensor names, q/k/v biases, NEOX rotation, rows unpermuted): the
  shared decoder reader/writer handle it (`DECODER`); this module adds
  `qwen2vl.rope.dimension_sections` = HF's mrope_section + [0], which must sum to head_dim / 2.
- A `qwen2vl` text model read without its mmproj is a plain qwen2 LM: with text only, M-RoPE's
  three position rows are equal, which is 1-D RoPE exactly.
- mmproj: `clip.projector_type` names the kind (`qwen2vl_merger`: Qwen2-VL, `qwen2.5vl_merger`:
  Qwen2.5-VL). The Conv3d patch embedding (W, C, 2, P, P) is stored as two Conv2d kernels, frame 0
  in `v.patch_embd.weight` and frame 1 in `v.patch_embd.weight.1`; the fused qkv as attn_q/k/v;
  `merger.ln_q` as `v.post_ln`; the merger MLP as `mm.0` / `mm.2`. Names are in tables below.
- Widths, depth, FFN and merge size come from the tensor shapes, heads from the metadata.
  llama.cpp's converter writes a Qwen2-VL tower's feed_forward_length as vision_config.hidden_size
  (the LM width); clip.cpp never uses it, so it is not read, and the export writes the true width.
- Window attention (2.5): llama.cpp keeps `clip.vision.n_wa_pattern` (full attention in every n-th
  block) and a 112-px window. fullatt_block_indexes must be that pattern to export; reading
  rebuilds them. `clip.vision.window_size` (llama.cpp's key for a window in pixels, ignored by its
  Qwen2.5-VL graph) is written too, so another window size round-trips.
- Image budget: llama.cpp fixes its own for these projectors (8..4096 tokens, user-adjustable);
  the HF processor's min/max pixels go to `clip.vision.image_min_pixels` / `image_max_pixels`
  (keys clip.cpp reads for other projectors) and come back from there; absent, HF's defaults.
- The vision tower's norms use eps 1e-6 in HF whatever the file says; written as 1e-6.
- The mmproj is F16 (F32 for an F32 export), 1-D tensors F32, as the converter writes it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, Keys, LlamaFileType
import gguf

from ....errors import UnsupportedModelError, WeightsError
from ....weights.gguf import GGUFFile, HFCheckpoint, LazyTensors, SplitGGUF, meta_bool, open_gguf
from ....weights.gguf_read import (check_projection_width, check_shape, meta_int, meta_triple, mmproj_projector,
                                   vision_language_config)
from ....weights.gguf_tokenizer import GGUFVocab
from ....weights.gguf_write import Planned, need, tensor_type, write_tensors, write_text_model
from .image_processing import IMAGE_DEFAULTS, QwenProcessorConfig

log = logging.getLogger(__name__)

ARCH = "qwen2vl"             # llama.cpp's text architecture for both Qwen2-VL and Qwen2.5-VL
DECODER = "qwen2"            # its tensors are qwen2's (the shared reader validates them)
PROJECTOR_TYPES = {"qwen2vl_merger": "qwen2_vl", "qwen2.5vl_merger": "qwen2_5_vl"}   # clip-impl.h
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
          "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}

# mmproj, per block: llama.cpp `v.blk.{i}.{key}.{weight|bias}` <-> HF `visual.blocks.{i}.{value}.*`
BLOCK_NAMES = {
    "qwen2_vl": {"ln1": "norm1", "ln2": "norm2", "attn_out": "attn.proj",
                 "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
    "qwen2_5_vl": {"ln1": "norm1", "ln2": "norm2", "attn_out": "attn.proj",
                   "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"},
}
QKV = ("attn_q", "attn_k", "attn_v")     # the thirds of `attn.qkv`, in this order
GLOBAL_NAMES = {"v.post_ln": "merger.ln_q", "mm.0": "merger.mlp.0", "mm.2": "merger.mlp.2"}
PATCH_EMBD = ("v.patch_embd.weight", "v.patch_embd.weight.1")   # frames 0 and 1 of patch_embed.proj.weight
VISION_PREFIX = "visual."
LLAMA_CPP_IMAGE_SIZE = 560     # what the converter writes when vision_config has no image_size (unused)
LLAMA_CPP_WINDOW = 112         # clip.cpp's Qwen2.5-VL window in pixels
_VISION_EPS = 1e-6


# --- reading -----------------------------------------------------------------------------
def read_gguf(text: GGUFFile | SplitGGUF, config: dict[str, Any], tensors: LazyTensors, vocab: GGUFVocab,
              tokenizer_json: str, tokenizer_config: dict[str, Any], mmproj_path: str | Path | None,
              dtype: torch.dtype) -> HFCheckpoint:
    """A qwen2vl text model (its decoder already read as qwen2 `config` / `tensors`) and its mmproj
    as an HF Qwen2-VL / Qwen2.5-VL checkpoint: transformers 5's nested config, the names
    save_pretrained writes (`model.layers.*`, `lm_head.weight`, `visual.*`)."""
    sections = _dimension_sections(text, config["head_dim"])
    if mmproj_path is None:
        log.info("%s: a qwen2vl language model without its mmproj runs as a text-only qwen2 model", text.path)
        return HFCheckpoint(config, tensors, tokenizer_json, tokenizer_config, None)
    with open_gguf(mmproj_path) as proj:
        kind, vision_config, vision_tensors, preprocessor = _read_mmproj(proj, dtype)
    check_projection_width(mmproj_path, vision_tensors["visual.merger.mlp.2.weight"].shape[0], config)
    index = {token: i for i, token in enumerate(vocab.tokens)}
    ids = {}
    for key, token in TOKENS.items():
        if token not in index:
            raise WeightsError(f"{text.path}: the vocabulary has no {token} token, which a {kind} prompt needs")
        ids[key] = index[token]
    text = dict(model_type=f"{kind}_text",
                rope_parameters={**config["rope_parameters"], "mrope_section": list(sections)})
    hf = vision_language_config(config, vision_config, text, architectures=[ARCHITECTURES[kind]], model_type=kind,
                                **ids)
    for name, tensor in vision_tensors.items():
        tensors.add_tensor(name, tensor)
    return HFCheckpoint(hf, tensors, tokenizer_json, tokenizer_config, preprocessor)


def _dimension_sections(gf: GGUFFile | SplitGGUF, head_dim: int) -> tuple[int, int, int]:
    """`qwen2vl.rope.dimension_sections` -> HF's mrope_section (t, h, w)."""
    key = f"{ARCH}.rope.dimension_sections"
    value = gf.metadata.get(key)
    if value is None:
        raise WeightsError(f"{gf.path}: {key} is missing (the M-RoPE sections of a qwen2vl model)")
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu" or value.shape != (4,) or (value < 0).any():
        raise WeightsError(f"{gf.path}: {key} = {value!r} is not four non-negative integers"[:300])
    t, h, w, extra = (int(x) for x in value)
    if extra:
        raise UnsupportedModelError(f"{gf.path}: {key} {[t, h, w, extra]} has a fourth section; Qwen2-VL's "
                                    f"M-RoPE has three (temporal, height, width) and a 0")
    if t + h + w != head_dim // 2:
        raise WeightsError(f"{gf.path}: {key} {[t, h, w, extra]} sums to {t + h + w}, but the head size "
                           f"{head_dim} has {head_dim // 2} rotary frequencies; the sections must add up to "
                           f"head_dim / 2 = {head_dim // 2}")
    return t, h, w


_BLOCK_TENSOR = re.compile(r"v\.blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)")


def _read_mmproj(gf: GGUFFile | SplitGGUF, dtype: torch.dtype) -> tuple[str, dict, dict[str, torch.Tensor], dict]:
    meta, names = gf.metadata, gf.tensors
    projector = mmproj_projector(gf)
    kind = PROJECTOR_TYPES.get(projector)
    if kind is None:
        raise UnsupportedModelError(
            f"{gf.path}: projector type {projector!r} does not go with a qwen2vl language model "
            f"(foveal reads {' and '.join(repr(p) for p in PROJECTOR_TYPES)} mmproj files for it)")
    for required in (*PATCH_EMBD, "v.post_ln.weight", "mm.0.weight", "mm.2.weight"):
        if required not in names:
            raise WeightsError(f"{gf.path}: tensor {required} is missing from a {projector} mmproj")
    frame0, frame1 = (names[n].shape for n in PATCH_EMBD)
    if len(frame0) != 4 or frame0 != frame1 or frame0[1] != 3 or frame0[2] != frame0[3]:
        raise WeightsError(f"{gf.path}: {PATCH_EMBD[0]} and {PATCH_EMBD[1]} are not two square RGB patch "
                           f"kernels of one shape ({list(frame0)}, {list(frame1)})")
    width, _, patch, _ = frame0
    if "v.patch_embd.bias" in names or "v.position_embd.weight" in names or "v.class_embd" in names:
        raise UnsupportedModelError(f"{gf.path}: a {projector} tower has no patch bias, class or position "
                                    f"embedding (clip.cpp's qwen2vl graph asserts it)")

    blocks: dict[int, set[str]] = {}
    block_names = BLOCK_NAMES[kind]
    known = {*GLOBAL_NAMES, *PATCH_EMBD}
    for name in names:
        if m := _BLOCK_TENSOR.fullmatch(name):
            if m[2] not in block_names and m[2] not in QKV:
                raise UnsupportedModelError(f"{gf.path}: tensor {name!r} is not part of a {kind} vision block")
            blocks.setdefault(int(m[1]), set()).add(f"{m[2]}.{m[3]}")
        elif name not in known and name.rsplit(".", 1)[0] not in GLOBAL_NAMES:
            log.warning("%s: ignoring tensor %r (not part of a %s tower)", gf.path, name, kind)
    depth = len(blocks)
    if not depth or sorted(blocks) != list(range(depth)):
        raise WeightsError(f"{gf.path}: vision blocks are missing or not numbered 0..N-1")
    if meta_int(meta, "clip.vision.block_count", depth, hi=1 << 12) != depth:
        raise WeightsError(f"{gf.path}: clip.vision.block_count disagrees with the {depth} stored blocks")
    if meta_int(meta, "clip.vision.embedding_length", width, hi=1 << 16) != width \
            or meta_int(meta, "clip.vision.patch_size", patch, hi=1 << 12) != patch:
        raise WeightsError(f"{gf.path}: clip.vision.* disagrees with {PATCH_EMBD[0]}")
    heads = meta_int(meta, "clip.vision.attention.head_count", hi=1 << 12)
    if width % heads or (width // heads) % 4:
        raise WeightsError(f"{gf.path}: width {width} over {heads} heads is not a head size divisible by 4")
    merge = meta_int(meta, Keys.ClipVision.SPATIAL_MERGE_SIZE, 2, hi=64)
    merged = width * merge * merge
    check_shape("mm.0.weight", names["mm.0.weight"].shape, (merged, merged))
    out_width = names["mm.2.weight"].shape[0] if len(names["mm.2.weight"].shape) == 2 else 0
    check_shape("mm.2.weight", names["mm.2.weight"].shape, (out_width or 1, merged))

    up = names.get("v.blk.0.ffn_up.weight")
    up = up.shape if up is not None and len(up.shape) == 2 else (0, 0)
    # clip.cpp swaps ffn_up / ffn_down back for files from the old qwen2_vl surgery script
    swapped = up[0] == width and up[1] != width
    ffn = up[1] if swapped else up[0]
    if not ffn:
        raise WeightsError(f"{gf.path}: v.blk.0.ffn_up.weight is missing or not a matrix")
    if swapped:
        block_names = {**block_names, "ffn_up": block_names["ffn_down"], "ffn_down": block_names["ffn_up"]}
    ffn_shape = {"ffn_gate": (ffn, width), "ffn_up": (ffn, width), "ffn_down": (width, ffn)}
    if swapped:
        ffn_shape["ffn_up"], ffn_shape["ffn_down"] = ffn_shape["ffn_down"], ffn_shape["ffn_up"]
    expected = {"ln1": (width,), "ln2": (width,), "attn_q": (width, width), "attn_k": (width, width),
                "attn_v": (width, width), "attn_out": (width, width), **ffn_shape}
    norm_bias = kind == "qwen2_vl"      # LayerNorm (Qwen2-VL) vs RMSNorm (Qwen2.5-VL)

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in names:
            raise WeightsError(f"{gf.path}: tensor {name} is missing")
        check_shape(name, names[name].shape, shape)
        return gf.tensor(name, dtype)

    tensors: dict[str, torch.Tensor] = {}
    p = VISION_PREFIX
    tensors[f"{p}patch_embed.proj.weight"] = torch.stack([take(n, tuple(frame0)) for n in PATCH_EMBD], dim=2)
    for i in range(depth):
        present = blocks[i]
        wanted = {f"{k}.weight" for k in (*QKV, *block_names)} | {f"{k}.bias" for k in (*QKV, *block_names)
                                                                  if norm_bias or not k.startswith("ln")}
        if extra := present - wanted:
            raise UnsupportedModelError(f"{gf.path}: vision block {i} has {sorted(extra)}, which a {kind} "
                                        f"block has not")
        for part in ("weight", "bias"):
            tensors[f"{p}blocks.{i}.attn.qkv.{part}"] = torch.cat(
                [take(f"v.blk.{i}.{k}.{part}", expected[k] if part == "weight" else (width,)) for k in QKV])
        for key, hf in block_names.items():
            tensors[f"{p}blocks.{i}.{hf}.weight"] = take(f"v.blk.{i}.{key}.weight", expected[key])
            if norm_bias or not key.startswith("ln"):
                tensors[f"{p}blocks.{i}.{hf}.bias"] = take(f"v.blk.{i}.{key}.bias", expected[key][:1])
    tensors[f"{p}merger.ln_q.weight"] = take("v.post_ln.weight", (width,))
    if norm_bias:
        tensors[f"{p}merger.ln_q.bias"] = take("v.post_ln.bias", (width,))
    elif "v.post_ln.bias" in names:
        raise UnsupportedModelError(f"{gf.path}: v.post_ln.bias in a Qwen2.5-VL mmproj (its merger norm is "
                                    f"an RMSNorm)")
    for gguf_name, hf in (("mm.0", "merger.mlp.0"), ("mm.2", "merger.mlp.2")):
        weight = take(f"{gguf_name}.weight", tuple(names[f"{gguf_name}.weight"].shape))
        tensors[f"{p}{hf}.weight"] = weight
        tensors[f"{p}{hf}.bias"] = take(f"{gguf_name}.bias", (weight.shape[0],))

    if meta_bool(meta, Keys.ClipVision.USE_SILU):
        act = "silu"
    elif meta_bool(meta, Keys.ClipVision.USE_GELU):   # llama.cpp's gelu is the tanh approximation
        act = "gelu_pytorch_tanh"
    else:
        act = "quick_gelu"
    common = dict(depth=depth, num_heads=heads, hidden_act=act, in_channels=3, patch_size=patch,
                  spatial_merge_size=merge, temporal_patch_size=2)
    if kind == "qwen2_vl":
        if ffn % width:
            raise UnsupportedModelError(f"{gf.path}: FFN width {ffn} is not a whole multiple (mlp_ratio) of "
                                        f"the tower's width {width}")
        vision_config = {"model_type": "qwen2_vl_vision", **common, "embed_dim": width, "hidden_size": out_width,
                         "mlp_ratio": ffn // width}
    else:
        pattern = meta_int(meta, Keys.ClipVision.N_WA_PATTERN, lo=0, hi=depth)
        full = [i for i in range(depth) if (i + 1) % pattern == 0] if pattern else list(range(depth))
        vision_config = {"model_type": "qwen2_5_vl_vision", **common, "hidden_size": width,
                         "intermediate_size": ffn, "out_hidden_size": out_width,
                         "window_size": meta_int(meta, Keys.ClipVision.WINDOW_SIZE, LLAMA_CPP_WINDOW, hi=1 << 16),
                         "fullatt_block_indexes": full}
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True,
        "image_mean": meta_triple(meta.get(Keys.ClipVision.IMAGE_MEAN), list(IMAGE_DEFAULTS.image_mean)),
        "image_std": meta_triple(meta.get(Keys.ClipVision.IMAGE_STD), list(IMAGE_DEFAULTS.image_std)),
        "patch_size": patch, "merge_size": merge, "temporal_patch_size": 2,
        "size": {"shortest_edge": meta_int(meta, Keys.ClipVision.IMAGE_MIN_PIXELS, IMAGE_DEFAULTS.min_pixels),
                 "longest_edge": meta_int(meta, Keys.ClipVision.IMAGE_MAX_PIXELS, IMAGE_DEFAULTS.max_pixels)},
    }
    return kind, vision_config, tensors, preprocessor


# --- writing -----------------------------------------------------------------------------
# transformers 5's save_pretrained keeps 4.x names; a v5-style checkpoint nests them
_HF_RENAMES = {"model.language_model.": "model.", "model.visual.": "visual."}


def _saved_name(name: str) -> str:
    for prefix, saved in _HF_RENAMES.items():
        if name.startswith(prefix):
            return saved + name[len(prefix):]
    return name


def write_gguf(ckpt: HFCheckpoint, out: Path, *, type: str, head_type: str,  # noqa: A002
               stem: str) -> tuple[Path, Path]:
    """The text model (arch qwen2vl) and the mmproj llama.cpp's converter writes for this checkpoint."""
    from .family import config as family_config
    cfg = family_config(ckpt.config)          # both HF layouts, class defaults, mrope_section checked
    t = cfg.text
    if t.rope.kind != "default":
        raise UnsupportedModelError(f"RoPE scaling {t.rope.kind!r} with M-RoPE has no llama.cpp qwen2vl equivalent")
    tensors = {_saved_name(k): v for k, v in ckpt.tensors.items()}
    text_tensors = {k: v for k, v in tensors.items() if not k.startswith(VISION_PREFIX)}
    vision_tensors = {k[len(VISION_PREFIX):]: v for k, v in tensors.items() if k.startswith(VISION_PREFIX)}
    text_cfg = {
        "model_type": DECODER, "vocab_size": t.vocab_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim, "hidden_act": t.hidden_act, "mlp_bias": t.mlp_bias,
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "tie_word_embeddings": t.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope.theta},
    }
    sections = [*t.mrope_section, 0]   # llama.cpp pads to 4: [time, height, width, extra]
    text_path = out / f"{stem}-{type.upper()}.gguf"
    write_text_model(text_path, text_cfg, text_tensors, ckpt, type, stem, head_type, arch=ARCH,
                     add_metadata=lambda writer: writer.add_rope_dimension_sections(sections))
    mmproj_path = out / f"mmproj-{stem}-{'F32' if type == 'f32' else 'F16'}.gguf"
    _write_mmproj(mmproj_path, cfg, vision_tensors, ckpt.preprocessor_config or {},
                  Q.F32 if type == "f32" else Q.F16, stem, t.hidden_size)
    return text_path, mmproj_path


def _write_mmproj(path: Path, cfg, tensors: dict[str, torch.Tensor], preprocessor: dict[str, Any], float_type: Q,
                  name: str, text_width: int) -> None:
    v, kind = cfg.vision, cfg.kind
    if v.temporal_patch_size != 2 or v.in_channels != 3:
        raise UnsupportedModelError(f"llama.cpp splits the patch embedding into two RGB frames; this tower takes "
                                    f"{v.temporal_patch_size} frame(s) of {v.in_channels} channels")
    pattern = 0
    if kind == "qwen2_5_vl":
        full = list(v.fullatt_block_indexes)
        pattern = full[0] + 1 if full else 0
        if not pattern or full != [i for i in range(v.depth) if (i + 1) % pattern == 0]:
            raise UnsupportedModelError(
                f"vision_config.fullatt_block_indexes {full} is not 'every n-th block of {v.depth}', the only "
                f"window-attention layout llama.cpp's Qwen2.5-VL graph has (clip.vision.n_wa_pattern)")
    if v.hidden_act not in ("quick_gelu", "silu", "gelu", "gelu_pytorch_tanh"):
        raise UnsupportedModelError(f"vision activation {v.hidden_act!r} has no llama.cpp equivalent")
    processor = QwenProcessorConfig.from_hf(preprocessor)

    writer = gguf.GGUFWriter(path=None, arch="clip")
    writer.add_type("mmproj")
    writer.add_name(name)
    writer.add_file_type(int(LlamaFileType.ALL_F32 if float_type == Q.F32 else LlamaFileType.MOSTLY_F16))
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(next(p for p, k in PROJECTOR_TYPES.items() if k == kind))
    writer.add_vision_projection_dim(text_width)
    writer.add_vision_image_size(LLAMA_CPP_IMAGE_SIZE)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.width)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_block_count(v.depth)
    writer.add_vision_head_count(v.num_heads)
    writer.add_vision_image_mean([float(x) for x in processor.image_mean])
    writer.add_vision_image_std([float(x) for x in processor.image_std])
    writer.add_vision_attention_layernorm_eps(_VISION_EPS)
    writer.add_vision_use_gelu(v.hidden_act in ("gelu", "gelu_pytorch_tanh"))
    writer.add_vision_use_silu(v.hidden_act == "silu")
    writer.add_vision_spatial_merge_size(v.spatial_merge_size)
    if kind == "qwen2_5_vl":
        writer.add_vision_n_wa_pattern(pattern)
        writer.add_vision_window_size(v.window_size)
    writer.add_vision_min_pixels(processor.min_pixels)
    writer.add_vision_max_pixels(processor.max_pixels)

    def planned(gguf_name: str, tensor: torch.Tensor) -> Planned:
        return Planned(gguf_name, tensor, Q.F32 if tensor.dim() == 1 else tensor_type(float_type, tensor))

    used: set[str] = set()

    def take(hf: str) -> torch.Tensor:
        used.add(hf)
        return need(tensors, hf)

    patch = take("patch_embed.proj.weight")      # (W, C, 2, P, P)
    if patch.dim() != 5 or patch.shape[2] != 2:
        raise WeightsError(f"visual.patch_embed.proj.weight has shape {list(patch.shape)}, not (W, C, 2, P, P)")
    plan = [planned(PATCH_EMBD[f], patch[:, :, f].contiguous()) for f in range(2)]
    norm_bias = kind == "qwen2_vl"
    for i in range(v.depth):
        for part in ("weight", "bias"):
            for key, third in zip(QKV, take(f"blocks.{i}.attn.qkv.{part}").chunk(3)):
                plan.append(planned(f"v.blk.{i}.{key}.{part}", third.contiguous()))
        for key, hf in BLOCK_NAMES[kind].items():
            plan.append(planned(f"v.blk.{i}.{key}.weight", take(f"blocks.{i}.{hf}.weight")))
            if norm_bias or not key.startswith("ln"):
                plan.append(planned(f"v.blk.{i}.{key}.bias", take(f"blocks.{i}.{hf}.bias")))
    for gguf_name, hf in GLOBAL_NAMES.items():
        plan.append(planned(f"{gguf_name}.weight", take(f"{hf}.weight")))
        if norm_bias or gguf_name != "v.post_ln":
            plan.append(planned(f"{gguf_name}.bias", take(f"{hf}.bias")))
    if extra := sorted(set(tensors) - used):
        raise WeightsError(f"the vision tower has tensors with no place in llama.cpp's {kind} mmproj: "
                           f"{', '.join(VISION_PREFIX + n for n in extra[:5])}")
    write_tensors(writer, path, plan)


__all__ = ["ARCH", "DECODER", "PROJECTOR_TYPES", "read_gguf", "write_gguf"]
