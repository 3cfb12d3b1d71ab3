"""Reading GGUF: a llama.cpp text model (and its mmproj) as an HFCheckpoint.

Design decisions
- Files are parsed and validated by `foveal.weights.gguf.GGUFFile`; this module decides what
  they mean, reading every metadata value through a type check (a corrupt file may hold any
  type under any key).
- llama.cpp's converter permutes the rows of llama-arch q/k weights (and biases) so its
  rotary code can rotate interleaved pairs; HF rotates the two halves of each head. We undo
  that permutation on the quantized rows (rows are independent in every GGUF block format).
  qwen2 uses llama.cpp's NEOX rotary and is stored unpermuted.
- Text models with tensors llama.cpp would not expect are refused (llama.cpp refuses them too);
  an mmproj's extra tensors are ignored with a warning.
- LLaVA-1.6 mmproj files (`clip.vision.image_grid_pinpoints`, merge type `spatial_unpad`,
  `model.image_newline`) become a `llava_next` config: anyres tiling as in transformers, whose
  pinpoint pairs are (height, width); the pairs are read in the order written (every shipped
  list is symmetric). llama.cpp's own resampling of the tiles differs slightly from HF's.
- Hyper-parameters come from the tensor shapes where they can (embedding width, FFN width,
  vocabulary, layer count) and are cross-checked with the metadata; head counts, epsilon,
  RoPE and context come from the metadata, with the HF class defaults when a key is absent.
- mmproj: llama.cpp's LLaVA mmproj keeps only the vision layers the features need. Files
  with `clip.vision.feature_layer` say which hidden state is used; legacy files (no key) were
  written with the unused last layer dropped, so the features are the output of the last
  stored layer (HF semantics; llama.cpp's graph runs one layer fewer on such files,
  ggml-org/llama.cpp#25817). CLIP vs SigLIP is told by the class embedding.
- Files from the legacy LLaVA converter name CLIP's fc1 `ffn_down` and fc2 `ffn_up`; like
  llama.cpp we detect that from the shapes and swap back.
- A text architecture a family owns (models.registry.GGUF_ARCHITECTURES: qwen2vl) is read here
  as the decoder it is built on (the family's DECODER: llama or qwen2 tensors, keys under its
  own arch) and handed, with the tokenizer, to the family's gguf.read_gguf for its mmproj and
  its HF config. A family whose decoder is neither reads it with its own `read_text_model`
  (gemma3; the tokenizer is still read here), and one whose file holds the vision tower too reads
  the whole file itself with `read_gguf_file` (mllama: cross-attention layers in the decoder).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import Keys

from foveal.errors import ConfigError, UnsupportedModelError, WeightsError
from foveal.models.registry import GGUF_ARCHITECTURES, gguf_family
from foveal.weights.gguf import (
    IMAGE_NEWLINE, LLAVA_TEXT_PREFIX, LLAVA_VISION_PREFIX, PROJECTOR_NAMES, TEXT_BLOCK_NAMES,
    TEXT_GLOBAL_NAMES, VISION_BLOCK_NAMES, VISION_GLOBAL_NAMES, GGUFFile, HFCheckpoint, LazyTensors, SplitGGUF,
    llama3_rope_factors, llama_qk_order, meta_bool, meta_str, open_gguf, short_float,
)
from foveal.weights.gguf_tokenizer import add_image_token, tokenizer_from_vocab, vocab_from_metadata

log = logging.getLogger(__name__)


# --- metadata helpers --------------------------------------------------------------------
def meta_int(meta: dict[str, Any], key: str, default: int | None = None, *, lo: int = 1, hi: int = 1 << 31) -> int:
    value = meta.get(key, default)
    if value is None:
        raise WeightsError(f"GGUF metadata lacks {key}")
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WeightsError(f"GGUF metadata {key} = {value!r} is not an integer in [{lo}, {hi}]")
    return value


def meta_float(meta: dict[str, Any], key: str, default: float) -> float:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise WeightsError(f"GGUF metadata {key} = {value!r} is not a positive number")
    return float(value)


def check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise WeightsError(f"GGUF tensor {name} has shape {list(shape)}, expected {list(expected)}")


# --- text model --------------------------------------------------------------------------
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)")
_HF_TEXT_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def read_gguf(text_path: str | Path, mmproj_path: str | Path | None, *, dtype: torch.dtype) -> HFCheckpoint:
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, not {dtype}")
    text = open_gguf(text_path)  # a split model: its first shard; stays open for the lazy tensors
    try:
        arch = meta_str(text.metadata, Keys.General.ARCHITECTURE)
        if arch == "clip":
            raise WeightsError(
                f"{text.path} is a vision projector (mmproj) file; pass the language model "
                f"GGUF as the model and this file as its mmproj"
            )
        family = gguf_family(arch)   # a family that owns its GGUF mapping (registry.GGUF_ARCHITECTURES)
        if family is not None and hasattr(family, "read_gguf_file"):   # it reads the whole file (mllama)
            return family.read_gguf_file(text, mmproj_path, dtype)
        if family is not None and hasattr(family, "read_text_model"):   # its own decoder (gemma3)
            config, tensors = family.read_text_model(text, dtype)
        else:
            layout = family.DECODER if family is not None else arch
            if layout not in _HF_TEXT_CLASS:
                raise UnsupportedModelError(
                    f"{text.path}: GGUF architecture {arch!r} is not supported "
                    f"(foveal reads {', '.join([*_HF_TEXT_CLASS, *GGUF_ARCHITECTURES])} language models)"
                )
            config, tensors = _read_text_model(text, arch, dtype, layout)
        vocab = vocab_from_metadata(text.metadata, config["vocab_size"])
    except BaseException:
        text.close()
        raise
    tokenizer_json, tokenizer_config = tokenizer_from_vocab(vocab)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    for key, token_id in (("bos_token_id", vocab.bos_id), ("eos_token_id", vocab.eos_id),
                          ("pad_token_id", vocab.pad_id)):
        config[key] = token_id
    name = text.metadata.get(Keys.General.NAME)
    if isinstance(name, str) and name:
        config["_name_or_path"] = name  # an export of this checkpoint keeps the name
    if family is not None:
        try:
            return family.read_gguf(text, config, tensors, vocab, tokenizer_json, tokenizer_config,
                                    mmproj_path, dtype)
        except BaseException:
            text.close()
            raise
    if mmproj_path is None:
        return HFCheckpoint(config, tensors, tokenizer_json, tokenizer_config, None)

    with open_gguf(mmproj_path) as proj:
        vision_config, llava, vision_tensors, preprocessor = _read_mmproj(proj, dtype)
    check_projection_width(mmproj_path, vision_tensors["multi_modal_projector.linear_2.weight"].shape[0], config)
    image_token, tokenizer_json = add_image_token(vocab, tokenizer_json)
    text_config = {k: v for k, v in config.items() if k != "architectures"}
    anyres = "image_grid_pinpoints" in llava
    llava_config = {
        **({"_name_or_path": config["_name_or_path"]} if "_name_or_path" in config else {}),
        "architectures": ["LlavaNextForConditionalGeneration" if anyres else "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if anyres else "llava",
        "image_token_index": image_token,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        **llava,
        "tie_word_embeddings": config["tie_word_embeddings"],
        "dtype": config["dtype"],
        "text_config": text_config,
        "vision_config": vision_config,
    }
    all_tensors = tensors.prefixed(LLAVA_TEXT_PREFIX)
    for k, v in vision_tensors.items():
        all_tensors.add_tensor(k, v)
    return HFCheckpoint(llava_config, all_tensors, tokenizer_json, tokenizer_config, preprocessor)


def attention_shape(gf: GGUFFile | SplitGGUF, arch: str, hidden: int, model: str) -> tuple[int, int, int]:
    """(heads, kv heads, head dim) from `arch`'s attention keys, refusing a value width unlike the key width
    or query heads that do not group over the kv heads (no `model` has either)."""
    meta = gf.metadata
    heads = meta_int(meta, f"{arch}.attention.head_count", hi=1 << 16)
    kv_heads = meta_int(meta, f"{arch}.attention.head_count_kv", heads, hi=heads)
    head_dim = meta_int(meta, f"{arch}.attention.key_length", hidden // heads or None, hi=1 << 16)
    if meta_int(meta, f"{arch}.attention.value_length", head_dim, hi=1 << 16) != head_dim or heads % kv_heads:
        raise UnsupportedModelError(f"{gf.path}: value width or head grouping unlike any {model} model")
    return heads, kv_heads, head_dim


def _read_text_model(gf: GGUFFile | SplitGGUF, arch: str, dtype: torch.dtype,
                     layout: str | None = None) -> tuple[dict[str, Any], LazyTensors]:
    """The decoder of a text model GGUF as an HF llama / qwen2 config and tensors. `layout` is the
    decoder's tensor layout (llama or qwen2) when `arch` is another name for it (qwen2vl: qwen2's
    tensors with M-RoPE); metadata keys are read under `arch`."""
    layout = layout or arch
    meta, names = gf.metadata, gf.tensors
    blocks: dict[int, set[str]] = {}
    for name in names:
        if m := _BLOCK_TENSOR.fullmatch(name):
            if m[2] not in TEXT_BLOCK_NAMES:
                raise WeightsError(f"{gf.path}: tensor {name!r} has no place in a {arch} model")
            blocks.setdefault(int(m[1]), set()).add(f"{m[2]}.{m[3]}")
        elif name.removesuffix(".weight") not in TEXT_GLOBAL_NAMES and name != "rope_freqs.weight":
            # llama.cpp refuses a model with tensors it does not expect; so do we
            raise WeightsError(f"{gf.path}: unexpected tensor {name!r} in a {arch} model")
    n_layers = len(blocks)
    if n_layers == 0 or sorted(blocks) != list(range(n_layers)):
        raise WeightsError(f"{gf.path}: transformer blocks are missing or not numbered 0..N-1")
    block_count = meta_int(meta, f"{arch}.block_count", n_layers, hi=1 << 16)
    if block_count != n_layers:
        raise WeightsError(f"{gf.path}: {arch}.block_count is {block_count} but the file has {n_layers} blocks")
    if "token_embd.weight" not in names or "output_norm.weight" not in names:
        raise WeightsError(f"{gf.path}: token_embd.weight or output_norm.weight is missing")

    vocab_size, hidden = names["token_embd.weight"].shape if len(names["token_embd.weight"].shape) == 2 else (0, 0)
    if not vocab_size:
        raise WeightsError(f"{gf.path}: token_embd.weight is not a matrix")
    heads, kv_heads, head_dim = attention_shape(gf, arch, hidden, f"HF {arch}")
    if meta_int(meta, f"{arch}.rope.dimension_count", head_dim, hi=1 << 16) != head_dim:
        raise UnsupportedModelError(f"{gf.path}: partial rotary embeddings are not supported")
    check_shape("output_norm.weight", names["output_norm.weight"].shape, (hidden,))
    if meta_int(meta, f"{arch}.embedding_length", hidden, hi=1 << 20) != hidden:
        raise WeightsError(f"{gf.path}: {arch}.embedding_length disagrees with token_embd.weight")
    ffn = names["blk.0.ffn_up.weight"].shape[0] if "blk.0.ffn_up.weight" in names else 0
    if meta_int(meta, f"{arch}.feed_forward_length", ffn or None, hi=1 << 20) != ffn:
        raise WeightsError(f"{gf.path}: {arch}.feed_forward_length disagrees with ffn_up")

    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    expected = {
        "attn_norm.weight": (hidden,), "ffn_norm.weight": (hidden,),
        "attn_q.weight": (q_rows, hidden), "attn_k.weight": (kv_rows, hidden),
        "attn_v.weight": (kv_rows, hidden), "attn_output.weight": (hidden, q_rows),
        "ffn_gate.weight": (ffn, hidden), "ffn_up.weight": (ffn, hidden), "ffn_down.weight": (hidden, ffn),
    }
    biases = {"attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,),
              "attn_output.bias": (hidden,)}
    present_biases = set().union(*blocks.values()) & set(biases)
    if layout == "qwen2" and present_biases != {"attn_q.bias", "attn_k.bias", "attn_v.bias"}:
        raise WeightsError(f"{gf.path}: a {arch} model has q/k/v biases and no output bias")
    for i, keys in blocks.items():
        if missing := set(expected) - keys:
            raise WeightsError(f"{gf.path}: block {i} lacks {sorted(missing)}")
        for key in keys:
            if key not in expected and key not in biases:
                raise WeightsError(f"{gf.path}: tensor blk.{i}.{key} has no place in a {arch} model")
            check_shape(f"blk.{i}.{key}", names[f"blk.{i}.{key}"].shape, {**expected, **biases}[key])

    tied = "output.weight" not in names
    if not tied:
        check_shape("output.weight", names["output.weight"].shape, (vocab_size, hidden))
    rope = _rope_parameters(gf, arch, head_dim)
    config: dict[str, Any] = {
        "architectures": [_HF_TEXT_CLASS[layout]],
        "model_type": layout,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        # absent keys take the HF class defaults (Llama 2048 positions, Qwen2 32768; eps 1e-6)
        "max_position_embeddings": meta_int(meta, f"{arch}.context_length", 2048 if layout == "llama" else 32768),
        "rms_norm_eps": meta_float(meta, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_parameters": rope,
        "tie_word_embeddings": tied,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if layout == "llama":
        config.update(attention_bias=bool(present_biases), mlp_bias=False)
    else:
        config.update(use_sliding_window=False)

    tensors = LazyTensors()    # converted when the loader takes them (see gguf.py)

    def lazy(hf_name: str, name: str, order=None) -> None:
        tensors.add(hf_name, names[name].shape, dtype, functools.partial(gf.tensor, name, dtype, order))
    for gguf_name, hf_name in TEXT_GLOBAL_NAMES.items():
        if f"{gguf_name}.weight" in names:
            lazy(f"{hf_name}.weight", f"{gguf_name}.weight")
    orders = {}
    if layout == "llama":  # undo llama.cpp's q/k row permutation
        orders = {"attn_q": llama_qk_order(q_rows, heads), "attn_k": llama_qk_order(kv_rows, kv_heads)}
        orders = {k: np.argsort(v) for k, v in orders.items()}
    for i in range(n_layers):
        for key, hf in TEXT_BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                name = f"blk.{i}.{key}.{kind}"
                if name in names:
                    lazy(f"model.layers.{i}.{hf}.{kind}", name, orders.get(key))
                elif layout == "llama" and present_biases and f"{key}.bias" in biases and kind == "bias":
                    # HF's attention_bias is all-or-nothing; a missing bias is an exact zero
                    tensors.add_tensor(f"model.layers.{i}.{hf}.bias", torch.zeros(biases[f"{key}.bias"], dtype=dtype))
    return config, tensors


def _rope_parameters(gf: GGUFFile | SplitGGUF, arch: str, head_dim: int) -> dict[str, Any]:
    meta = gf.metadata
    theta = meta_float(meta, f"{arch}.rope.freq_base", 10000.0)
    kind = meta_str(meta, f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in gf.tensors:  # llama.cpp stores Llama 3.1 scaling as frequency factors
        check_shape("rope_freqs.weight", gf.tensors["rope_freqs.weight"].shape, (head_dim // 2,))
        factors = gf.tensor("rope_freqs.weight", torch.float64).numpy()
        context = meta_int(meta, f"{arch}.rope.scaling.original_context_length", 8192)
        return _llama3_rope(factors, theta, head_dim, context, gf.path)
    if kind == "none" and f"{arch}.rope.scale_linear" in meta:  # pre-2024 files
        kind, meta = "linear", {**meta, f"{arch}.rope.scaling.factor": meta[f"{arch}.rope.scale_linear"]}
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    factor = meta_float(meta, f"{arch}.rope.scaling.factor", 1.0)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    if kind == "yarn":
        rope = {
            "rope_type": "yarn", "factor": factor, "rope_theta": theta,
            "original_max_position_embeddings": meta_int(meta, f"{arch}.rope.scaling.original_context_length"),
        }
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                        ("yarn_attn_factor", "attention_factor")):
            if f"{arch}.rope.scaling.{key}" in meta:
                rope[hf] = meta_float(meta, f"{arch}.rope.scaling.{key}", 1.0)
        return rope
    raise UnsupportedModelError(f"{gf.path}: RoPE scaling {kind!r} is not supported")


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, context: int, path: Path) -> dict[str, Any]:
    """Recover Llama 3.1's rope_scaling from llama.cpp's per-frequency factors.

    HF: factor 1 where wavelen < L/high, `factor` where wavelen > L/low, and
    1 / ((1 - s) / factor + s) between, with s = (L / wavelen - low) / (high - low).
    """
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return {"rope_type": "default", "rope_theta": theta}
    high = factors <= 1.0 + 1e-6
    low = factors >= factor * (1 - 1e-6)
    mid = ~(high | low)
    x = context / wavelen
    if mid.sum() >= 2:  # s is linear in L / wavelen: fit it
        s = (factor / factors[mid] - 1) / (factor - 1)
        slope, intercept = np.polyfit(x[mid], s, 1)
        low_ff = -intercept / slope
        high_ff = low_ff + 1 / slope
    else:  # no smooth band to fit: put the band edges between the neighbouring frequencies
        high_ff = float(np.sqrt(x[high].min() * x[~high].max())) if high.any() and (~high).any() else float(x.max() * 2)
        low_ff = float(np.sqrt(x[low].max() * x[~low].min())) if low.any() and (~low).any() else float(x.min() / 2)
        if mid.sum() == 1:  # one smooth factor pins the low edge given the high one
            s = (factor / factors[mid][0] - 1) / (factor - 1)
            low_ff = (x[mid][0] - s * high_ff) / (1 - s)
    rope = {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": float(low_ff),
        "high_freq_factor": float(high_ff), "original_max_position_embeddings": context, "rope_theta": theta,
    }
    if not np.allclose(llama3_rope_factors(rope, head_dim), factors, rtol=1e-4):
        raise UnsupportedModelError(f"{path}: rope_freqs.weight does not follow Llama 3 RoPE scaling")
    # the fit gives 0.9999999986 for 1.0: keep the round numbers the config had when they fit
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in rope.items()}
    return rounded if np.allclose(llama3_rope_factors(rounded, head_dim), factors, rtol=1e-6) else rope


# --- mmproj ------------------------------------------------------------------------------
_VISION_BLOCK_TENSOR = re.compile(r"v\.blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)")
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def check_projection_width(mmproj_path, width: int, config: dict[str, Any]) -> None:
    """Refuse an mmproj whose projector writes `width` features into a language model of another width."""
    if width != config["hidden_size"]:
        raise WeightsError(f"{mmproj_path} projects to width {width} but the language model's is "
                           f"{config['hidden_size']}: the two files do not belong together")


def vision_language_config(config: dict[str, Any], vision_config: dict[str, Any], text_updates: dict | None = None,
                           **top) -> dict[str, Any]:
    """The HF config of a VLM whose language model GGUF gave `config`: `top` (architectures, model_type, token
    ids, ...) at the top with the tie flag and dtype, the text config (plus `text_updates`) and `vision_config`."""
    text_config = {k: v for k, v in config.items() if k not in ("architectures", "_name_or_path")}
    text_config.update(text_updates or {})
    return {
        **({"_name_or_path": config["_name_or_path"]} if "_name_or_path" in config else {}),
        **top,
        "tie_word_embeddings": config["tie_word_embeddings"],
        "dtype": config["dtype"],
        "text_config": text_config,
        "vision_config": vision_config,
    }


def mmproj_projector(gf: GGUFFile | SplitGGUF) -> str | None:
    """The projector type of an mmproj file with a vision encoder (None where it names none); anything else is
    refused."""
    meta = gf.metadata
    if meta_str(meta, Keys.General.ARCHITECTURE) != "clip":
        raise WeightsError(f"{gf.path} is not an mmproj file (general.architecture is not 'clip')")
    if meta_bool(meta, Keys.Clip.HAS_VISION_ENCODER) is False:
        raise UnsupportedModelError(f"{gf.path} has no vision encoder")
    return meta_str(meta, Keys.Clip.PROJECTOR_TYPE) or meta_str(meta, Keys.ClipVision.PROJECTOR_TYPE)


def _read_mmproj(gf: GGUFFile | SplitGGUF, dtype: torch.dtype) -> tuple[dict, dict, dict[str, torch.Tensor], dict]:
    meta, names = gf.metadata, gf.tensors
    projector = mmproj_projector(gf) or "mlp"
    if projector != "mlp":
        raise UnsupportedModelError(
            f"{gf.path}: projector type {projector!r} is not supported (foveal runs the LLaVA MLP 'mlp')"
        )
    for required in ("v.patch_embd.weight", "v.position_embd.weight", "mm.0.weight", "mm.2.weight"):
        if required not in names:
            raise (UnsupportedModelError if required == "mm.2.weight" else WeightsError)(
                f"{gf.path}: tensor {required} is missing"
            )
    blocks: dict[int, set[str]] = {}
    known = set(VISION_GLOBAL_NAMES) | {f"{p}.{kind}" for p in PROJECTOR_NAMES for kind in ("weight", "bias")}
    for name in names:
        if m := _VISION_BLOCK_TENSOR.fullmatch(name):
            if m[2] not in VISION_BLOCK_NAMES:
                raise UnsupportedModelError(f"{gf.path}: tensor {name!r} is not part of a CLIP/SigLIP block")
            blocks.setdefault(int(m[1]), set()).add(f"{m[2]}.{m[3]}")
        elif name not in known and name != IMAGE_NEWLINE:
            log.warning("%s: ignoring tensor %r (not part of a LLaVA-1.5/1.6 style model)", gf.path, name)
    n_stored = len(blocks)
    if sorted(blocks) != list(range(n_stored)):
        raise WeightsError(f"{gf.path}: vision blocks are not numbered 0..N-1")
    n_layers = meta_int(meta, "clip.vision.block_count", n_stored, lo=0, hi=n_stored)

    width, channels, patch, patch_w = names["v.patch_embd.weight"].shape if len(
        names["v.patch_embd.weight"].shape) == 4 else (0, 0, 0, 0)
    if not width or channels != 3 or patch != patch_w:
        raise WeightsError(f"{gf.path}: v.patch_embd.weight is not a square RGB patch convolution")
    siglip = "v.class_embd" not in names
    if siglip == ("v.pre_ln.weight" in names):
        raise UnsupportedModelError(f"{gf.path}: a vision tower that is neither CLIP- nor SigLIP-shaped")
    if not siglip and "v.patch_embd.bias" in names:
        raise UnsupportedModelError(f"{gf.path}: a CLIP tower with a patch-embedding bias")
    if meta_int(meta, "clip.vision.embedding_length", width, hi=1 << 16) != width \
            or meta_int(meta, "clip.vision.patch_size", patch, hi=1 << 12) != patch:
        raise WeightsError(f"{gf.path}: clip.vision.* disagrees with v.patch_embd.weight")
    image_size = meta_int(meta, "clip.vision.image_size", hi=1 << 15)
    n_patches = (image_size // patch) ** 2
    check_shape("v.position_embd.weight", names["v.position_embd.weight"].shape,
                 (n_patches + (0 if siglip else 1), width))
    heads = meta_int(meta, "clip.vision.attention.head_count", hi=1 << 12)
    eps = meta_float(meta, "clip.vision.attention.layer_norm_epsilon", 1e-6 if siglip else 1e-5)
    ffn = names["v.blk.0.ffn_up.weight"].shape if "v.blk.0.ffn_up.weight" in names else ()
    ffn = ffn if len(ffn) == 2 else (0, 0)
    # fc1 maps width -> ffn; legacy files store fc1 as ffn_down (clip.cpp swaps them too)
    swapped = ffn[0] == width and ffn[1] != width
    ffn_width = ffn[1] if swapped else ffn[0]
    if not n_layers or width % heads or not ffn_width:
        raise WeightsError(f"{gf.path}: vision tower has no usable blocks or a bad head count")

    block_names = dict(VISION_BLOCK_NAMES)
    if swapped:
        block_names["ffn_up"], block_names["ffn_down"] = "mlp.fc2", "mlp.fc1"
    expected = {
        "attn_q": (width, width), "attn_k": (width, width), "attn_v": (width, width),
        "attn_out": (width, width), "ln1": (width,), "ln2": (width,),
        "ffn_up": (width, ffn_width) if swapped else (ffn_width, width),
        "ffn_down": (ffn_width, width) if swapped else (width, ffn_width),
    }
    tensors: dict[str, torch.Tensor] = {}
    prefix = LLAVA_VISION_PREFIX
    for i in range(n_layers):
        for key, hf in block_names.items():
            if f"{key}.weight" not in blocks[i]:
                raise WeightsError(f"{gf.path}: vision block {i} lacks {key}.weight")
            check_shape(f"v.blk.{i}.{key}.weight", names[f"v.blk.{i}.{key}.weight"].shape, expected[key])
            tensors[f"{prefix}encoder.layers.{i}.{hf}.weight"] = gf.tensor(f"v.blk.{i}.{key}.weight", dtype)
            out_width = expected[key][0]
            if f"{key}.bias" in blocks[i]:
                check_shape(f"v.blk.{i}.{key}.bias", names[f"v.blk.{i}.{key}.bias"].shape, (out_width,))
                bias = gf.tensor(f"v.blk.{i}.{key}.bias", dtype)
            else:  # HF towers have every bias; an absent one is an exact zero
                bias = torch.zeros(out_width, dtype=dtype)
            tensors[f"{prefix}encoder.layers.{i}.{hf}.bias"] = bias
    if n_stored > n_layers:
        log.warning("%s: ignoring %d vision blocks past clip.vision.block_count", gf.path, n_stored - n_layers)
    for gguf_name, hf in VISION_GLOBAL_NAMES.items():
        if gguf_name in names:
            if gguf_name not in ("v.patch_embd.weight", "v.position_embd.weight"):  # checked above
                check_shape(gguf_name, names[gguf_name].shape, (width,))
            tensors[prefix + hf] = gf.tensor(gguf_name, dtype)
    if siglip and "v.patch_embd.bias" not in names:
        tensors[prefix + VISION_GLOBAL_NAMES["v.patch_embd.bias"]] = torch.zeros(width, dtype=dtype)

    feature_layers = meta.get("clip.vision.feature_layer")
    if feature_layers is not None and (not isinstance(feature_layers, np.ndarray) or feature_layers.dtype.kind not in "iu"):
        raise WeightsError(f"{gf.path}: clip.vision.feature_layer is not an integer array")
    if feature_layers is not None and len(feature_layers):
        layers = sorted({int(f) for f in feature_layers})  # llama.cpp keeps a set: layer order
        if layers[0] < 0 or layers[-1] > n_layers:
            raise WeightsError(f"{gf.path}: clip.vision.feature_layer {layers} outside 0..{n_layers}")
        negative = [f - (n_layers + 1) for f in layers]
        feature_layer: int | list[int] = negative[0] if len(negative) == 1 else negative
    else:
        layers, feature_layer = [n_layers], -1  # legacy: the stored layers are the ones used
    check_shape("mm.0.weight", names["mm.0.weight"].shape[1:], (width * len(layers),))
    text_width = names["mm.0.weight"].shape[0]
    check_shape("mm.2.weight", names["mm.2.weight"].shape, (text_width, text_width))
    for gguf_name, hf in PROJECTOR_NAMES.items():
        tensors[f"{hf}.weight"] = gf.tensor(f"{gguf_name}.weight", dtype)
        if f"{gguf_name}.bias" in names:
            check_shape(f"{gguf_name}.bias", names[f"{gguf_name}.bias"].shape, (text_width,))
            tensors[f"{hf}.bias"] = gf.tensor(f"{gguf_name}.bias", dtype)
        else:
            tensors[f"{hf}.bias"] = torch.zeros(text_width, dtype=dtype)

    pinpoints = _anyres_pinpoints(gf, meta, image_size, patch)
    if pinpoints is not None:
        if IMAGE_NEWLINE not in names:
            raise WeightsError(f"{gf.path}: a LLaVA-1.6 (spatial_unpad) mmproj without {IMAGE_NEWLINE}")
        check_shape(IMAGE_NEWLINE, names[IMAGE_NEWLINE].shape, (text_width,))
        tensors["image_newline"] = gf.tensor(IMAGE_NEWLINE, dtype)
    elif IMAGE_NEWLINE in names:
        log.warning("%s: ignoring %s (no image_grid_pinpoints with spatial_unpad: images are read at %d px only)",
                    gf.path, IMAGE_NEWLINE, image_size)

    if meta_bool(meta, Keys.ClipVision.USE_SILU):
        act = "silu"
    elif meta_bool(meta, Keys.ClipVision.USE_GELU):  # llama.cpp's gelu is the tanh approximation
        act = "gelu_pytorch_tanh" if siglip else "gelu"
    else:
        act = "quick_gelu"
    vision_config = {
        "model_type": "siglip_vision_model" if siglip else "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": ffn_width,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_channels": 3,
        "image_size": image_size,
        "patch_size": patch,
        "layer_norm_eps": eps,
        "hidden_act": act,
    }
    if siglip:
        vision_config["vision_use_head"] = False
    llava = {
        "vision_feature_layer": feature_layer,
        "vision_feature_select_strategy": "full" if siglip else "default",
        "image_seq_length": n_patches,
        **({"image_grid_pinpoints": pinpoints} if pinpoints is not None else {}),
    }
    mean = meta_triple(meta.get(Keys.ClipVision.IMAGE_MEAN), [0.5] * 3 if siglip else _CLIP_MEAN)
    std = meta_triple(meta.get(Keys.ClipVision.IMAGE_STD), [0.5] * 3 if siglip else _CLIP_STD)
    preprocessor = {
        "image_processor_type": "SiglipImageProcessor" if siglip else "CLIPImageProcessor",
        "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": mean, "image_std": std, "do_convert_rgb": True,
    }
    if siglip:  # SigLIP resizes straight to the square
        preprocessor["size"] = {"height": image_size, "width": image_size}
    else:
        preprocessor.update(size={"shortest_edge": image_size}, do_center_crop=True,
                            crop_size={"height": image_size, "width": image_size})
    return vision_config, llava, tensors, preprocessor


def _anyres_pinpoints(gf: GGUFFile | SplitGGUF, meta: dict[str, Any], image_size: int,
                      patch: int) -> list[list[int]] | None:
    """LLaVA-1.6's tiling resolutions, or None for a one-view (LLaVA-1.5 style) mmproj."""
    flat = meta.get("clip.vision.image_grid_pinpoints")
    if flat is None:
        return None
    merge = meta_str(meta, "clip.vision.mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
        log.warning("%s: image_grid_pinpoints with mm_patch_merge_type %r is not supported: images are read "
                    "at %d px only", gf.path, merge, image_size)
        return None
    if not isinstance(flat, np.ndarray) or flat.dtype.kind not in "iu" or flat.ndim != 1 or len(flat) % 2:
        raise WeightsError(f"{gf.path}: clip.vision.image_grid_pinpoints is not an even-length integer array")
    if image_size % patch:
        raise WeightsError(f"{gf.path}: anyres tiling needs image_size {image_size} to be a multiple of "
                           f"patch_size {patch}")
    from foveal.processing.anyres import check_pinpoints
    pairs = [[int(flat[i]), int(flat[i + 1])] for i in range(0, len(flat), 2)]
    try:
        check_pinpoints(pairs, tile=image_size)
    except ConfigError as e:
        raise WeightsError(f"{gf.path}: {e}") from None
    return pairs


def meta_triple(value: Any, default: list[float]) -> list[float]:
    if value is None:
        return default
    if not isinstance(value, np.ndarray) or value.shape != (3,) or not np.isfinite(value).all():
        raise WeightsError(f"GGUF image mean/std {value!r} is not three numbers")
    return [short_float(v) for v in value]
