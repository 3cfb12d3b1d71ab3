"""Gemma 3 as llama.cpp stores it: a `gemma3` text model and a `clip` mmproj with projector type `gemma3`.

Mirrors llama.cpp's converter (conversion/gemma.py `Gemma3Model`, `Gemma3VisionModel`, the keys of
conversion/base.py `TextModel` / `MmprojModel`) and its readers (src/models/gemma3.cpp, src/llama-model.cpp,
tools/mtmd/clip.cpp, tools/mtmd/models/siglip.cpp), as vendored by llama-cpp-python 0.3.36.
`weights/gguf_read.py` / `gguf_write.py` call `read_text_model` / `read_gguf` / `write_gguf` here for the
`gemma3` architecture (models/registry.py `GGUF_ARCHITECTURES`).

Design decisions
- Gemma's RMSNorms scale by (1 + w); llama.cpp's by w. The converter writes w + 1 for every text tensor whose
  name ends in `norm.weight` (input / post-attention / pre- and post-feedforward norms, q/k norms, the final
  norm) and for the projector's `mm_soft_emb_norm`; the SigLIP tower's LayerNorms are written as they are.
  Reading subtracts the 1 in float32, writing adds it.
- Tensor names: `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, attn_q_norm, attn_k_norm,
  post_attention_norm, ffn_norm, ffn_gate, ffn_up, ffn_down, post_ffw_norm}`, rows unpermuted (llama.cpp
  rotates Gemma NEOX-style, as HF does); mmproj: SigLIP's `v.*` names, `v.post_ln` (Gemma's features are
  after SigLIP's post_layernorm), `mm.input_projection.weight` (HF's (Dv, Dt) matrix as it is) and
  `mm.soft_emb_norm.weight`.
- What llama.cpp does not store, it fixes, and reading does the same: the attention scale is head_dim ** -0.5
  (query_pre_attn_scalar = head_dim), except for a 62-layer model (27B), hidden / heads; every 6th layer is
  global unless `gemma3.attention.sliding_window_pattern` says otherwise (a count or one bool per layer);
  the local RoPE is unscaled with base `gemma3.rope.freq_base_swa` (10,000 when absent); without
  `gemma3.attention.sliding_window` every layer attends globally; the global RoPE base defaults to 10,000.
  The export refuses a checkpoint whose values llama.cpp would get wrong (another query_pre_attn_scalar, a
  scaled local RoPE) instead of writing a file that answers differently.
- The export writes what the converter writes, plus `sliding_window_pattern` (one bool per layer) when the
  layers are not "every 6th global", which llama.cpp reads.
- `final_logit_softcapping` is carried both ways (the family logs that transformers' Gemma 3 VLM does not
  apply it; llama.cpp does).
- Pooling: llama.cpp reads the average pool's kernel from `clip.vision.projector.scale_factor` (4 when
  absent, every released Gemma 3); mm_tokens_per_image = (image_size / patch_size / kernel) ** 2.
- A gemma3 text model needs its mmproj: foveal runs Gemma 3 as Gemma3ForConditionalGeneration, and text-only
  Gemma 3 (Gemma3ForCausalLM) is not a family foveal has; such a file is refused by name.
- Image tokens: the vocabulary's `<start_of_image>`, `<end_of_image>` and `<image_soft_token>` (the rows the
  image fills); a vocabulary without one of them is refused.
- Pan-and-scan has no mmproj key (llama.cpp does not crop Gemma 3 images): a GGUF pair reads without it, and an
  export of a checkpoint that turns it on says so in a warning.
- The mmproj is F16 (F32 for an F32 export) except what the converter keeps F32: 1-D tensors and the patch
  and position embeddings; the input projection is F16 as the converter forces it.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, Keys, LlamaFileType
import gguf

from ....errors import UnsupportedModelError, WeightsError
from ....weights.gguf import GGUFFile, HFCheckpoint, LazyTensors, SplitGGUF, meta_bool, meta_str, open_gguf
from ....weights.gguf_read import (attention_shape, check_projection_width, check_shape, meta_float, meta_int,
                                   meta_triple, mmproj_projector, vision_language_config)
from ....weights.gguf_tokenizer import GGUFVocab
from ....weights.gguf_write import FILE_TYPES, Planned, add_vocab, need, tensor_type, write_tensors
from ....weights.safetensors import canonical_name

log = logging.getLogger(__name__)

ARCH = "gemma3"
PROJECTOR_TYPE = "gemma3"                  # clip-impl.h PROJECTOR_TYPE_GEMMA3
LLAMA_CPP_SWA_PATTERN = 6                  # llama.cpp's default: layers 5, 11, ... attend globally
LLAMA_CPP_POOL_KERNEL = 4                  # clip.cpp's default clip.vision.projector.scale_factor
LLAMA_CPP_ROPE_BASE = 10_000.0             # llama.cpp's default for rope.freq_base and freq_base_swa
TOKENS = {"boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>",
          "image_token_index": "<image_soft_token>"}

# text model, per block: llama.cpp `blk.{i}.{key}.weight` <-> HF `layers.{i}.{value}.weight`
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
NORMS = {"attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"}
GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm"}
# mmproj: per block `v.blk.{i}.{key}.{weight|bias}` <-> `encoder.layers.{i}.{value}` (SigLIP)
VISION_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2",
}
VISION_GLOBAL_NAMES = {   # whole names, relative to the tower
    "v.patch_embd.weight": "embeddings.patch_embedding.weight",
    "v.patch_embd.bias": "embeddings.patch_embedding.bias",
    "v.position_embd.weight": "embeddings.position_embedding.weight",
    "v.post_ln.weight": "post_layernorm.weight",
    "v.post_ln.bias": "post_layernorm.bias",
}
INPUT_PROJECTION, SOFT_EMB_NORM = "mm.input_projection.weight", "mm.soft_emb_norm.weight"
HF_INPUT_PROJECTION = "multi_modal_projector.mm_input_projection_weight"
HF_SOFT_EMB_NORM = "multi_modal_projector.mm_soft_emb_norm.weight"
# the names an HF hub checkpoint holds (what read_gguf produces)
TEXT_PREFIX, HEAD, VISION_PREFIX = "language_model.model.", "language_model.lm_head.weight", "vision_tower.vision_model."

_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)")
_VISION_BLOCK_TENSOR = re.compile(r"v\.blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)")


def _minus_one(gf: GGUFFile | SplitGGUF, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A stored (1 + w) norm weight as HF's w, subtracted in float32."""
    return (gf.tensor(name, torch.float32) - 1.0).to(dtype)


def _query_scalar(n_layers: int, hidden: int, heads: int, head_dim: int) -> float:
    """llama.cpp's attention scale (src/models/gemma3.cpp) as HF's query_pre_attn_scalar."""
    return float(hidden // heads) if n_layers == 62 else float(head_dim)


# --- reading -----------------------------------------------------------------------------
def read_text_model(gf: GGUFFile | SplitGGUF, dtype: torch.dtype) -> tuple[dict[str, Any], LazyTensors]:
    """The decoder of a gemma3 GGUF as an HF Gemma3TextConfig dict and `language_model.*` tensors."""
    meta, names = gf.metadata, gf.tensors
    if any(name.startswith(("v.", "mm.")) for name in names):
        raise UnsupportedModelError(
            f"{gf.path} holds the vision tower in the language model's file (Ollama's own Gemma 3 layout); foveal "
            f"reads llama.cpp's layout, a gemma3 text model plus its mmproj file (convert_hf_to_gguf.py --mmproj)")
    blocks: dict[int, set[str]] = {}
    for name in names:
        if m := _BLOCK_TENSOR.fullmatch(name):
            if m[2] not in BLOCK_NAMES or m[3] != "weight":
                raise WeightsError(f"{gf.path}: tensor {name!r} has no place in a gemma3 model")
            blocks.setdefault(int(m[1]), set()).add(m[2])
        elif name not in ("token_embd.weight", "output_norm.weight", "output.weight"):
            raise WeightsError(f"{gf.path}: unexpected tensor {name!r} in a gemma3 model")
    n_layers = len(blocks)
    if not n_layers or sorted(blocks) != list(range(n_layers)):
        raise WeightsError(f"{gf.path}: transformer blocks are missing or not numbered 0..N-1")
    if meta_int(meta, f"{ARCH}.block_count", n_layers, hi=1 << 16) != n_layers:
        raise WeightsError(f"{gf.path}: {ARCH}.block_count disagrees with the {n_layers} stored blocks")
    for required in ("token_embd.weight", "output_norm.weight"):
        if required not in names:
            raise WeightsError(f"{gf.path}: {required} is missing")
    embd = names["token_embd.weight"].shape
    if len(embd) != 2:
        raise WeightsError(f"{gf.path}: token_embd.weight is not a matrix")
    vocab_size, hidden = embd
    heads, kv_heads, head_dim = attention_shape(gf, ARCH, hidden, "Gemma 3")
    if meta_int(meta, f"{ARCH}.embedding_length", hidden, hi=1 << 20) != hidden:
        raise WeightsError(f"{gf.path}: {ARCH}.embedding_length disagrees with token_embd.weight")
    up = names.get("blk.0.ffn_up.weight")
    ffn = up.shape[0] if up is not None and len(up.shape) == 2 else 0
    if meta_int(meta, f"{ARCH}.feed_forward_length", ffn or None, hi=1 << 20) != ffn:
        raise WeightsError(f"{gf.path}: {ARCH}.feed_forward_length disagrees with blk.0.ffn_up.weight")
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    expected = {"attn_q": (q_rows, hidden), "attn_k": (kv_rows, hidden), "attn_v": (kv_rows, hidden),
                "attn_output": (hidden, q_rows), "attn_q_norm": (head_dim,), "attn_k_norm": (head_dim,),
                "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn),
                **{k: (hidden,) for k in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")}}
    for i, keys in blocks.items():
        if missing := set(BLOCK_NAMES) - keys:
            raise WeightsError(f"{gf.path}: block {i} lacks {sorted(missing)}")
        for key in keys:
            check_shape(f"blk.{i}.{key}.weight", names[f"blk.{i}.{key}.weight"].shape, expected[key])
    check_shape("output_norm.weight", names["output_norm.weight"].shape, (hidden,))
    tied = "output.weight" not in names
    if not tied:
        check_shape("output.weight", names["output.weight"].shape, (vocab_size, hidden))

    config: dict[str, Any] = {
        "model_type": "gemma3_text",
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": n_layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": meta_int(meta, f"{ARCH}.context_length", 131_072),
        "rms_norm_eps": meta_float(meta, f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6),
        "query_pre_attn_scalar": _query_scalar(n_layers, hidden, heads, head_dim),
        **_attention_layout(gf, n_layers),
        "tie_word_embeddings": tied,
        "dtype": str(dtype).removeprefix("torch."),
    }
    cap = meta.get(f"{ARCH}.final_logit_softcapping")
    if cap is not None:
        config["final_logit_softcapping"] = meta_float(meta, f"{ARCH}.final_logit_softcapping", 1.0)

    tensors = LazyTensors()    # converted when the loader takes them (weights/gguf.py)

    def lazy(hf_name: str, name: str, norm: bool = False) -> None:
        make = functools.partial(_minus_one if norm else gf.tensor, *((gf, name, dtype) if norm else (name, dtype)))
        tensors.add(hf_name, names[name].shape, dtype, make)
    lazy(f"{TEXT_PREFIX}embed_tokens.weight", "token_embd.weight")
    lazy(f"{TEXT_PREFIX}norm.weight", "output_norm.weight", norm=True)
    if not tied:
        lazy(HEAD, "output.weight")
    for i in range(n_layers):
        for key, hf in BLOCK_NAMES.items():
            lazy(f"{TEXT_PREFIX}layers.{i}.{hf}.weight", f"blk.{i}.{key}.weight", norm=key in NORMS)
    return config, tensors


def _attention_layout(gf: GGUFFile | SplitGGUF, n_layers: int) -> dict[str, Any]:
    """layer_types, sliding_window and the two RoPEs, as llama.cpp's gemma3 loader decides them."""
    meta = gf.metadata
    global_rope: dict[str, Any] = {"rope_type": "default",
                                   "rope_theta": meta_float(meta, f"{ARCH}.rope.freq_base", LLAMA_CPP_ROPE_BASE)}
    kind = meta_str(meta, f"{ARCH}.rope.scaling.type", "linear")       # llama.cpp's default name
    factor = meta.get(f"{ARCH}.rope.scaling.factor", meta.get(f"{ARCH}.rope.scale_linear"))
    if factor is not None:
        factor = meta_float(meta, f"{ARCH}.rope.scaling.factor" if f"{ARCH}.rope.scaling.factor" in meta
                            else f"{ARCH}.rope.scale_linear", 1.0)
    if kind not in ("none", "linear"):
        raise UnsupportedModelError(f"{gf.path}: RoPE scaling {kind!r} is not one foveal runs for Gemma 3 "
                                    f"(none or linear)")
    if kind == "linear" and factor is not None and factor != 1.0:
        global_rope.update(rope_type="linear", factor=factor)
    local_rope = {"rope_type": "default",
                  "rope_theta": meta_float(meta, f"{ARCH}.rope.freq_base_swa", LLAMA_CPP_ROPE_BASE)}
    window = meta.get(f"{ARCH}.attention.sliding_window")
    if window is None or window == 0:
        sliding = [False] * n_layers
        window = 4096           # Gemma3TextConfig's; no layer uses it
    else:
        window = meta_int(meta, f"{ARCH}.attention.sliding_window", hi=1 << 24)
        pattern = meta.get(f"{ARCH}.attention.sliding_window_pattern", LLAMA_CPP_SWA_PATTERN)
        if isinstance(pattern, np.ndarray):
            if pattern.ndim != 1 or len(pattern) != n_layers or pattern.dtype.kind not in "biu":
                raise WeightsError(f"{gf.path}: {ARCH}.attention.sliding_window_pattern is not one flag per layer "
                                   f"({n_layers} layers)")
            sliding = [bool(x) for x in pattern]
        else:
            n = meta_int(meta, f"{ARCH}.attention.sliding_window_pattern", LLAMA_CPP_SWA_PATTERN, lo=0, hi=1 << 16)
            # llama_hparams::set_swa_pattern: layer il slides when il % n < n - 1 (n = 0: all slide)
            sliding = [n == 0 or i % n < n - 1 for i in range(n_layers)]
    return {
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "sliding_window": window,
        "rope_parameters": {"full_attention": global_rope, "sliding_attention": local_rope},
    }


def read_gguf(text: GGUFFile | SplitGGUF, config: dict[str, Any], tensors: LazyTensors, vocab: GGUFVocab,
              tokenizer_json: str, tokenizer_config: dict[str, Any], mmproj_path: str | Path | None,
              dtype: torch.dtype) -> HFCheckpoint:
    """A gemma3 text model (read by `read_text_model`) and its mmproj as an HF Gemma3ForConditionalGeneration
    checkpoint: the hub's config.json layout and tensor names."""
    if mmproj_path is None:
        raise UnsupportedModelError(
            f"{text.path} is a Gemma 3 language model; foveal runs Gemma 3 with its vision tower: pass its "
            f"mmproj file too (mmproj=... / --mmproj). Text-only Gemma 3 (Gemma3ForCausalLM) is not supported")
    with open_gguf(mmproj_path) as proj:
        vision_config, vision_tensors, preprocessor, mm_tokens = _read_mmproj(proj, dtype)
    check_projection_width(mmproj_path, vision_tensors[HF_INPUT_PROJECTION].shape[1], config)
    index: dict[str, int] = {}
    for i, token in enumerate(vocab.tokens):
        index.setdefault(token, i)
    ids = {}
    for key, token in TOKENS.items():
        if token not in index:
            raise WeightsError(f"{text.path}: the vocabulary has no {token} token, which a Gemma 3 prompt with "
                               f"images needs")
        ids[key] = index[token]
    hf = vision_language_config(config, vision_config, architectures=["Gemma3ForConditionalGeneration"],
                                model_type="gemma3", **ids, mm_tokens_per_image=mm_tokens)
    for name, tensor in vision_tensors.items():
        tensors.add_tensor(name, tensor)
    return HFCheckpoint(hf, tensors, tokenizer_json, tokenizer_config, preprocessor)


def _read_mmproj(gf: GGUFFile | SplitGGUF, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor], dict, int]:
    meta, names = gf.metadata, gf.tensors
    projector = mmproj_projector(gf)
    if projector != PROJECTOR_TYPE:
        raise UnsupportedModelError(f"{gf.path}: projector type {projector!r} does not go with a gemma3 language "
                                    f"model (its mmproj has clip.projector_type 'gemma3')")
    for required in ("v.patch_embd.weight", "v.position_embd.weight", "v.post_ln.weight", INPUT_PROJECTION,
                     SOFT_EMB_NORM):
        if required not in names:
            raise WeightsError(f"{gf.path}: tensor {required} is missing from a gemma3 mmproj")
    patch_shape = names["v.patch_embd.weight"].shape
    if len(patch_shape) != 4 or patch_shape[1] != 3 or patch_shape[2] != patch_shape[3]:
        raise WeightsError(f"{gf.path}: v.patch_embd.weight is not a square RGB patch convolution")
    width, _, patch, _ = patch_shape
    if meta_int(meta, "clip.vision.embedding_length", width, hi=1 << 16) != width \
            or meta_int(meta, "clip.vision.patch_size", patch, hi=1 << 12) != patch:
        raise WeightsError(f"{gf.path}: clip.vision.* disagrees with v.patch_embd.weight")
    image_size = meta_int(meta, "clip.vision.image_size", hi=1 << 15)
    side = image_size // patch
    check_shape("v.position_embd.weight", names["v.position_embd.weight"].shape, (side * side, width))
    kernel = meta_int(meta, Keys.ClipVision.Projector.SCALE_FACTOR, LLAMA_CPP_POOL_KERNEL, hi=1 << 10)
    if image_size % patch or side % kernel:
        raise WeightsError(f"{gf.path}: {side} patches per side (image_size {image_size} / patch_size {patch}) "
                           f"do not pool by clip.vision.projector.scale_factor {kernel}")
    blocks: dict[int, set[str]] = {}
    known = {*VISION_GLOBAL_NAMES, INPUT_PROJECTION, SOFT_EMB_NORM}
    for name in names:
        if m := _VISION_BLOCK_TENSOR.fullmatch(name):
            if m[2] not in VISION_BLOCK_NAMES:
                raise UnsupportedModelError(f"{gf.path}: tensor {name!r} is not part of a SigLIP block")
            blocks.setdefault(int(m[1]), set()).add(f"{m[2]}.{m[3]}")
        elif name not in known:
            log.warning("%s: ignoring tensor %r (not part of a Gemma 3 tower)", gf.path, name)
    depth = len(blocks)
    if not depth or sorted(blocks) != list(range(depth)):
        raise WeightsError(f"{gf.path}: vision blocks are missing or not numbered 0..N-1")
    if meta_int(meta, "clip.vision.block_count", depth, hi=1 << 12) != depth:
        raise WeightsError(f"{gf.path}: clip.vision.block_count disagrees with the {depth} stored blocks")
    heads = meta_int(meta, "clip.vision.attention.head_count", hi=1 << 12)
    if width % heads:
        raise WeightsError(f"{gf.path}: width {width} does not split into {heads} heads")
    up = names.get("v.blk.0.ffn_up.weight")
    up = up.shape if up is not None and len(up.shape) == 2 else (0, 0)
    swapped = up[0] == width and up[1] != width      # clip.cpp swaps them back for old files
    ffn = up[1] if swapped else up[0]
    if not ffn:
        raise WeightsError(f"{gf.path}: v.blk.0.ffn_up.weight is missing or not a matrix")
    block_names = dict(VISION_BLOCK_NAMES)
    if swapped:
        block_names["ffn_up"], block_names["ffn_down"] = "mlp.fc2", "mlp.fc1"
    out = {"attn_q": width, "attn_k": width, "attn_v": width, "attn_out": width, "ln1": width, "ln2": width,
           "ffn_up": width if swapped else ffn, "ffn_down": ffn if swapped else width}
    shapes = {"attn_q": (width, width), "attn_k": (width, width), "attn_v": (width, width),
              "attn_out": (width, width), "ln1": (width,), "ln2": (width,),
              "ffn_up": (width, ffn) if swapped else (ffn, width), "ffn_down": (ffn, width) if swapped else (width, ffn)}

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in names:
            raise WeightsError(f"{gf.path}: tensor {name} is missing")
        check_shape(name, names[name].shape, shape)
        return gf.tensor(name, dtype)

    tensors: dict[str, torch.Tensor] = {}
    p = VISION_PREFIX
    for i in range(depth):
        for key, hf in block_names.items():
            tensors[f"{p}encoder.layers.{i}.{hf}.weight"] = take(f"v.blk.{i}.{key}.weight", shapes[key])
            tensors[f"{p}encoder.layers.{i}.{hf}.bias"] = take(f"v.blk.{i}.{key}.bias", (out[key],))
    global_shapes = {"v.patch_embd.weight": tuple(patch_shape), "v.patch_embd.bias": (width,),
                     "v.position_embd.weight": (side * side, width), "v.post_ln.weight": (width,),
                     "v.post_ln.bias": (width,)}
    for gguf_name, hf in VISION_GLOBAL_NAMES.items():
        tensors[p + hf] = take(gguf_name, global_shapes[gguf_name])
    projection = names[INPUT_PROJECTION].shape
    if len(projection) != 2 or projection[0] != width:
        raise WeightsError(f"GGUF tensor {INPUT_PROJECTION} has shape {list(projection)}, expected [{width}, text width]")
    tensors[HF_INPUT_PROJECTION] = take(INPUT_PROJECTION, tuple(projection))
    check_shape(SOFT_EMB_NORM, names[SOFT_EMB_NORM].shape, (width,))
    tensors[HF_SOFT_EMB_NORM] = _minus_one(gf, SOFT_EMB_NORM, dtype)

    if meta_bool(meta, Keys.ClipVision.USE_GELU) is False:
        raise UnsupportedModelError(f"{gf.path}: a gemma3 tower uses GELU (clip.use_gelu is false)")
    eps = meta_float(meta, "clip.vision.attention.layer_norm_epsilon", 1e-6)
    vision_config = {
        "model_type": "siglip_vision_model", "hidden_size": width, "intermediate_size": ffn,
        "num_hidden_layers": depth, "num_attention_heads": heads, "num_channels": 3, "image_size": image_size,
        "patch_size": patch, "layer_norm_eps": eps, "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
    }
    mm_tokens = (side // kernel) ** 2
    preprocessor = {
        "image_processor_type": "Gemma3ImageProcessor",
        "do_resize": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "do_pan_and_scan": False,
        "image_mean": meta_triple(meta.get(Keys.ClipVision.IMAGE_MEAN), [0.5] * 3),
        "image_std": meta_triple(meta.get(Keys.ClipVision.IMAGE_STD), [0.5] * 3),
        "size": {"height": image_size, "width": image_size},
        "image_seq_length": mm_tokens,
    }
    return vision_config, tensors, preprocessor, mm_tokens


# --- writing -----------------------------------------------------------------------------
def write_gguf(ckpt: HFCheckpoint, out: Path, *, type: str, head_type: str,  # noqa: A002
               stem: str) -> tuple[Path, Path]:
    """The text model (arch gemma3) and the mmproj llama.cpp's converter writes for this checkpoint."""
    from .config import config as family_config
    cfg = family_config(ckpt.config)          # class defaults for absent keys, the family's checks
    tensors = {canonical_name(k): v for k, v in ckpt.tensors.items()}
    text_path = out / f"{stem}-{type.upper()}.gguf"
    _write_text_model(text_path, cfg, tensors, ckpt, type, head_type, stem)
    mmproj_path = out / f"mmproj-{stem}-{'F32' if type == 'f32' else 'F16'}.gguf"
    _write_mmproj(mmproj_path, cfg, tensors, ckpt.preprocessor_config or {}, Q.F32 if type == "f32" else Q.F16, stem)
    return text_path, mmproj_path


def _write_text_model(path: Path, cfg, tensors: dict[str, torch.Tensor], ckpt: HFCheckpoint, type: str,  # noqa: A002
                      head_type: str, name: str) -> None:
    t = cfg.text
    n, hidden, heads = t.num_hidden_layers, t.hidden_size, t.num_attention_heads
    expected_scalar = _query_scalar(n, hidden, heads, t.head_dim)
    if float(t.query_pre_attn_scalar) != expected_scalar:
        raise UnsupportedModelError(
            f"text_config.query_pre_attn_scalar is {t.query_pre_attn_scalar}, but llama.cpp's gemma3 graph scales "
            f"attention by head_dim ** -0.5 ({t.head_dim}; hidden_size / heads for a 62-layer model) and stores no "
            f"scalar: the file would answer differently")
    if t.local_rope.kind != "default" or t.local_rope.factor != 1.0:
        raise UnsupportedModelError("llama.cpp runs Gemma 3's sliding layers with an unscaled RoPE; this "
                                    f"checkpoint scales it ({t.local_rope.kind})")
    weight_type, file_type = FILE_TYPES[type]
    tied = t.tie_word_embeddings
    embed = need(tensors, "language_model.embed_tokens.weight")
    if tuple(embed.shape) != (t.vocab_size, hidden):
        raise WeightsError(f"language_model.embed_tokens.weight has shape {list(embed.shape)}, the config implies "
                           f"{[t.vocab_size, hidden]}")
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(n)
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(t.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(t.num_key_value_heads)
    writer.add_key_length(t.head_dim)
    writer.add_value_length(t.head_dim)
    writer.add_layer_norm_rms_eps(float(t.rms_norm_eps))
    if t.rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(t.rope.factor))
    writer.add_rope_freq_base(float(t.rope.theta))
    writer.add_rope_freq_base_swa(float(t.local_rope.theta))
    cap = (ckpt.config.get("text_config") or {}).get("final_logit_softcapping")
    if cap:
        writer.add_final_logit_softcapping(float(cap))
    sliding = [t.is_sliding(i) for i in range(n)]
    if any(sliding):
        writer.add_sliding_window(int(t.sliding_window))
        if sliding != [i % LLAMA_CPP_SWA_PATTERN < LLAMA_CPP_SWA_PATTERN - 1 for i in range(n)]:
            writer.add_sliding_window_pattern(sliding)      # llama.cpp reads one flag per layer
    add_vocab(writer, ckpt, t.vocab_size)

    def text_type(gguf_name: str, tensor: torch.Tensor) -> Q:
        if tensor.dim() == 1:
            return Q.F32
        is_head = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        return tensor_type(FILE_TYPES[head_type][0] if is_head else weight_type, tensor)

    def plus_one(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(torch.float32) + 1.0

    used = set()

    def take(hf: str) -> torch.Tensor:
        used.add(hf)
        return need(tensors, hf)

    plan = [Planned("token_embd.weight", embed, text_type("token_embd.weight", embed))]
    used.add("language_model.embed_tokens.weight")
    plan.append(Planned("output_norm.weight", plus_one(take("language_model.norm.weight")), Q.F32))
    if not tied:
        head = take("lm_head.weight")
        plan.append(Planned("output.weight", head, text_type("output.weight", head)))
    for i in range(n):
        for key, hf in BLOCK_NAMES.items():
            tensor = take(f"language_model.layers.{i}.{hf}.weight")
            plan.append(Planned(f"blk.{i}.{key}.weight", plus_one(tensor) if key in NORMS else tensor,
                                text_type(key, tensor)))
    extra = sorted(k for k in set(tensors) - used if k.startswith("language_model.") or k == "lm_head.weight")
    if tied:
        extra = [k for k in extra if k != "lm_head.weight"]
    if extra:
        raise WeightsError(f"the language model has tensors with no place in llama.cpp's gemma3 model: "
                           f"{', '.join(extra[:5])}")
    write_tensors(writer, path, plan)


def _write_mmproj(path: Path, cfg, tensors: dict[str, torch.Tensor], preprocessor: dict[str, Any], float_type: Q,
                  name: str) -> None:
    from .family import image_config
    from .pan_and_scan import PanAndScan
    v = cfg.vision
    if v.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
        raise UnsupportedModelError(f"vision activation {v.hidden_act!r}: llama.cpp's gemma3 tower is GELU")
    processor = image_config(cfg, preprocessor)       # the family's checks (size = the tower's, ...)
    if PanAndScan.from_hf(preprocessor) is not None:
        log.warning("preprocessor_config.json turns on pan-and-scan, which llama.cpp's gemma3 mmproj has no key for: "
                    "the GGUF pair sees each image whole, without crops")
    writer = gguf.GGUFWriter(path=None, arch="clip")
    writer.add_type("mmproj")
    writer.add_name(name)
    writer.add_file_type(int(LlamaFileType.ALL_F32 if float_type == Q.F32 else LlamaFileType.MOSTLY_F16))
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(cfg.text.hidden_size)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden_size)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_block_count(v.num_hidden_layers)
    writer.add_vision_head_count(v.num_attention_heads)
    writer.add_vision_image_mean([float(x) for x in processor.image_mean])
    writer.add_vision_image_std([float(x) for x in processor.image_std])
    writer.add_clip_projector_type(PROJECTOR_TYPE)
    writer.add_vision_attention_layernorm_eps(float(v.layer_norm_eps))
    writer.add_vision_use_gelu(True)
    if cfg.pool_kernel != LLAMA_CPP_POOL_KERNEL:
        writer.add_vision_projector_scale_factor(cfg.pool_kernel)

    def planned(gguf_name: str, tensor: torch.Tensor, forced: Q | None = None) -> Planned:
        if tensor.dim() == 1:
            return Planned(gguf_name, tensor, Q.F32)
        return Planned(gguf_name, tensor, tensor_type(float_type if forced is None else forced, tensor))

    used = set()

    def take(hf: str) -> torch.Tensor:
        used.add(hf)
        return need(tensors, hf)

    p = "vision_tower."
    plan = []
    for gguf_name, hf in VISION_GLOBAL_NAMES.items():
        # the converter keeps the embeddings F32 (tensor_force_quant: ".embeddings.")
        plan.append(planned(gguf_name, take(p + hf), Q.F32 if "embd" in gguf_name else None))
    for i in range(v.num_hidden_layers):
        for key, hf in VISION_BLOCK_NAMES.items():
            for part in ("weight", "bias"):
                plan.append(planned(f"v.blk.{i}.{key}.{part}", take(f"{p}encoder.layers.{i}.{hf}.{part}")))
    plan.append(planned(INPUT_PROJECTION, take(HF_INPUT_PROJECTION), Q.F32 if float_type == Q.F32 else Q.F16))
    plan.append(Planned(SOFT_EMB_NORM, take(HF_SOFT_EMB_NORM).to(torch.float32) + 1.0, Q.F32))
    extra = sorted(k for k in set(tensors) - used if k.startswith((p, "multi_modal_projector.")))
    if extra:
        raise WeightsError(f"the vision tower has tensors with no place in llama.cpp's gemma3 mmproj: "
                           f"{', '.join(extra[:5])}")
    write_tensors(writer, path, plan)


__all__ = ["ARCH", "PROJECTOR_TYPE", "read_text_model", "read_gguf", "write_gguf"]
