"""Llama 3.2 Vision as Ollama stores it: one `mllama` GGUF holding the text model and the vision tower.

Mirrors Ollama's converter (convert/convert_mllama.go over convert/convert_llama.go, convert/convert.go,
convert/tokenizer.go, convert/reader.go `Kind`) and the engine that ran these files
(model/models/mllama/{model,model_text,model_vision,process_image}.go, removed from Ollama in
ollama/ollama#16031, May 2026; read at its parent f63eea3d). `weights/gguf_read.py` hands this module
the whole file for the `mllama` architecture (models/registry.py `GGUF_ARCHITECTURES`, `DECODER = None`):
its cross-attention layers have no place in the shared llama reader.

Design decisions
- One file. convert_mllama.go writes every tensor (`v.*` tower, `mm.0` projector, text) into the model
  GGUF, and the mllama model loads `v` and `mm.0` from it. The older store (a model blob plus a
  `projector` blob, from Ollama's pre-2025 llama.cpp mllama patch) is refused, as Ollama refuses it
  ("no longer compatible ... re-download"; server/routes.go): its conventions are not in the converter.
- Names: the converter's `strings.NewReplacer` pairs (llama's, then mllama's), applied with Go's rule
  (at each position, the first pair in argument order that matches; no overlaps) to the names the
  published checkpoint has (`language_model.model.*`, `language_model.lm_head.*`, `vision_model.*`,
  `multi_modal_projector.*`). Reading maps every tensor the model needs through the same function, so
  no GGUF name is written down twice.
- Repacks the converter applies, undone on reading:
  * text `attn_q` / `attn_k` and the cross-attention `cross_attn_q_proj` / `cross_attn_k_proj` (they end
    in `attn_q_proj.weight`, ollama/ollama#10716): llama's rotary row permutation, with the text
    heads (q) and KV heads (k);
  * vision `attn_q` / `attn_k` (local and global layers): the same permutation with the vision heads;
  * vision gates are stored as tanh(g) (`pre_tile_position_embd.gate`, `post_tile_position_embd.gate`,
    the global layers' `attn_gate` / `ffn_gate`); the gated position embedding's one gate becomes two
    tensors, `v.position_embd.gate` = 1 - tanh(g) and `v.tile_position_embd.gate` = tanh(g). Reading
    takes g = atanh of the tile gate and checks that the two agree. The text layers' cross-attention
    gates are stored as they are (the model applies tanh).
- Tensor types as reader.go's `Kind`: F32 for 1-D tensors, biases and the position / tile embeddings,
  F16 for the rest, except that a BF16 checkpoint's text matrices stay BF16 (reader_safetensors.go;
  the published checkpoint is BF16); `f32` writes everything F32. Ollama quantizes later
  (`ollama create -q`); any type gguf can dequantize is read.
- Metadata: `mllama.*` = the llama keys of text_config (block_count, context_length, embedding_length,
  feed_forward_length, attention.head_count / head_count_kv / layer_norm_rms_epsilon,
  rope.dimension_count, rope.freq_base, vocab_size), `mllama.attention.cross_attention_layers`, and
  `mllama.vision.*` (block_count, global.block_count, intermediate_layers_indices, embedding_length,
  feed_forward_length, attention.head_count, attention.layer_norm_epsilon, image_size, patch_size,
  max_num_tiles, num_channels). Llama 3.1 RoPE scaling is the `rope_freqs.weight` factors, as llama's.
  The converter reads transformers 4's rope_theta / rope_scaling; the export also takes transformers
  5's rope_parameters (the same values), so a checkpoint saved today converts as the published one did.
- Not in the file, and so as the engine fixes them: supported aspect ratios (every w x h <= max tiles, w
  outer: HF's order), the vision output width (hidden x (1 + intermediate layers)), CLIP's mean / std
  (imageproc.ClipDefaultMean / STD, the published checkpoint's values), `<|image|>` as the image token
  (found by name; the engine hard-codes its id 128256), the Llama 3 split regex (hard-coded in
  model.go whatever tokenizer.ggml.pre says) and a BOS unless add_bos_token says otherwise.
- Pixels are HF's (MllamaImageProcessor: PIL bilinear), which Ollama's Go bilinear resize approximates;
  like transformers, and unlike Ollama's engine (it attends only to the last image), every image of a
  prompt is attended to.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, Keys, LlamaFileType
import gguf

from ....errors import ConfigError, UnsupportedModelError, WeightsError
from ....weights.gguf import GGUFFile, HFCheckpoint, LazyTensors, SplitGGUF, llama3_rope_factors, llama_qk_order
from ....weights.gguf_read import _rope_parameters, check_shape, meta_float, meta_int
from ....weights.gguf_tokenizer import tokenizer_from_vocab, vocab_from_metadata
from ....weights.gguf_write import Planned, tensor_type, write_tensors

log = logging.getLogger(__name__)

ARCH = "mllama"
DECODER = None          # this module reads the whole file (weights/gguf_read.py)
IMAGE_TOKEN = "<|image|>"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]       # model/imageproc/images.go ClipDefaultMean / STD
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# convert_llama.go llamaModel.Replacements(), then convert_mllama.go mllamaModel.Replacements()
REPLACEMENTS = [
    ("lm_head", "output"),
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("model.layers", "blk"),
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.down_proj", "ffn_down"),
    ("mlp.up_proj", "ffn_up"),
    ("post_attention_layernorm", "ffn_norm"),
    ("language_model.", ""),
    ("gate_attn", "attn_gate"),
    ("gate_ffn", "ffn_gate"),
    ("cross_attn.", "cross_attn_"),
    ("vision_model", "v"),
    ("class_embedding", "class_embd"),
    ("patch_embedding", "patch_embd"),
    ("gated_positional_embedding.tile_embedding", "tile_position_embd"),
    ("gated_positional_embedding.embedding", "position_embd.weight"),
    ("gated_positional_embedding", "position_embd"),
    ("embedding.weight", "weight"),
    ("pre_tile_positional_embedding", "pre_tile_position_embd"),
    ("post_tile_positional_embedding", "post_tile_position_embd"),
    ("layernorm_pre", "pre_ln"),
    ("layernorm_post", "post_ln"),
    ("global_transformer.layers", "global.blk"),
    ("transformer.layers", "blk"),
    ("mlp.fc1", "ffn_up"),
    ("mlp.fc2", "ffn_down"),
    ("multi_modal_projector", "mm.0"),
]
POSITION_GATE, TILE_GATE = "v.position_embd.gate", "v.tile_position_embd.gate"
HF_POSITION_GATE = "vision_model.gated_positional_embedding.gate"
ASPECT_GATES = ("v.pre_tile_position_embd.gate", "v.post_tile_position_embd.gate")
F32_NAMES = {"v.position_embd.weight", "v.tile_position_embd.weight", "v.pre_tile_position_embd.weight",
             "v.post_tile_position_embd.weight"}     # reader.go Kind: always F32
# convert/tokenizer.go: sha256 of the pre-tokenizer's Split regexes -> tokenizer.ggml.pre
PRE_BY_DIGEST = {
    "d98f9631be1e9607a9848c26c1f9eac1aa9fc21ac6ba82a2fc0741af9780a48f": "llama-bpe",
    "03df5c5863ad70781dcfdef491ead25140f895fe8010964be0daefe27be32b02": "deepseek-llm",
    "21cde974d587f0d54dc8d56b183cc1e6239600172035c68fbd6d4b9f8da0576e": "deepseek-coder",
    "1ff7f41064896984db5d1bb6ff64fa4bc29007d08c1b439e505b7392777a319e": "qwen2",
}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER = 1, 3, 4     # tokenizer.go tokenType*
_HUB_PREFIXES = {"model.language_model.": "language_model.model.", "model.vision_model.": "vision_model.",
                 "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."}


def ollama_name(name: str) -> str:
    """The GGUF name convert_mllama.go gives a checkpoint tensor: Go's strings.Replacer over REPLACEMENTS."""
    out, i = [], 0
    while i < len(name):
        for old, new in REPLACEMENTS:
            if name.startswith(old, i):
                out.append(new)
                i += len(old)
                break
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def hub_name(name: str) -> str:
    """A checkpoint name in the published layout (what the converter reads)."""
    for prefix, hub in _HUB_PREFIXES.items():
        if name.startswith(prefix):
            return hub + name[len(prefix):]
    return name


def _qk_heads(gguf_name: str, text_heads: int, kv_heads: int, vision_heads: int) -> int | None:
    """Heads of the rotary row permutation the converter applied to this tensor (None: not permuted)."""
    if gguf_name.startswith("v."):
        return vision_heads if gguf_name.endswith(("attn_q.weight", "attn_k.weight")) else None
    if gguf_name.endswith(("attn_q.weight", "attn_q_proj.weight")):
        return text_heads
    if gguf_name.endswith(("attn_k.weight", "attn_k_proj.weight")):
        return kv_heads
    return None


def _tanh_stored(gguf_name: str) -> bool:
    """Vision gates the converter stores as tanh(g)."""
    return gguf_name in ASPECT_GATES or (gguf_name.startswith("v.") and gguf_name.endswith(("attn_gate", "ffn_gate")))


# --- reading -----------------------------------------------------------------------------
def read_gguf_file(gf: GGUFFile | SplitGGUF, mmproj_path: str | Path | None, dtype: torch.dtype) -> HFCheckpoint:
    """An Ollama `mllama` GGUF as the HF checkpoint it was converted from: transformers' config, the
    published tensor names, the tokenizer and MllamaImageProcessor's settings."""
    from . import family as F
    if mmproj_path is not None:
        raise UnsupportedModelError(
            f"{gf.path} is an mllama model with a separate projector ({mmproj_path}): the layout of Ollama's "
            f"old llama3.2-vision, which Ollama itself no longer runs; re-pull it (`ollama pull llama3.2-vision`) "
            f"for the single-file layout foveal reads")
    meta, names = gf.metadata, gf.tensors
    if not any(n.startswith("v.") for n in names):
        raise WeightsError(f"{gf.path}: an mllama GGUF without its vision tower (no v.* tensors): not the "
                           f"single-file llama3.2-vision that Ollama's converter writes")
    raw = _hf_config(gf, dtype)
    tokens = meta.get(Keys.Tokenizer.LIST)
    vocab = vocab_from_metadata(meta, len(tokens) if isinstance(tokens, list) and tokens else 1)
    if IMAGE_TOKEN not in vocab.tokens:
        raise WeightsError(f"{gf.path}: the vocabulary has no {IMAGE_TOKEN} token, which an mllama prompt needs")
    raw["image_token_index"] = vocab.tokens.index(IMAGE_TOKEN)
    try:
        cfg = F.config(raw)
    except ConfigError as e:
        raise WeightsError(f"{gf.path}: {e}") from None
    t, v = cfg.text, cfg.vision
    with torch.device("meta"):
        model = F.build(cfg)
    wanted = {F.hf_name(n, cfg): tuple(p.shape) for n, p in model.named_parameters()}
    by_gguf: dict[str, str] = {}
    for hf in wanted:
        by_gguf[TILE_GATE if hf == HF_POSITION_GATE else ollama_name(hf)] = hf
    missing = [g for g in by_gguf if g not in names] + [POSITION_GATE] * (POSITION_GATE not in names)
    if missing:
        raise WeightsError(f"{gf.path}: tensor {missing[0]} is missing ({len(missing)} missing; an mllama model "
                           f"with these settings needs them)")
    extra = sorted(set(names) - set(by_gguf) - {POSITION_GATE, "rope_freqs.weight"})
    if extra:
        raise WeightsError(f"{gf.path}: unexpected tensor(s) {', '.join(extra[:5])} in an mllama model with "
                           f"these settings")
    for g, hf in by_gguf.items():
        check_shape(g, names[g].shape, wanted[hf])
    check_shape(POSITION_GATE, names[POSITION_GATE].shape, (1,))

    tensors = LazyTensors()
    for g, hf in by_gguf.items():
        heads = _qk_heads(g, t.num_attention_heads, t.num_key_value_heads, v.attention_heads)
        order = None if heads is None else np.argsort(llama_qk_order(wanted[hf][0], heads))
        if g == TILE_GATE:
            make = functools.partial(_gated_position_gate, gf, dtype)
        elif _tanh_stored(g):
            make = functools.partial(_atanh_tensor, gf, g, dtype)
        else:
            make = functools.partial(gf.tensor, g, dtype, order)
        tensors.add(hf, wanted[hf], dtype, make)

    if vocab.pre != "llama-bpe":       # model.go splits with Llama 3's regex whatever the file names
        log.info("%s: tokenizer.ggml.pre %r; splitting with Llama 3's regex, as Ollama's mllama model does",
                 gf.path, vocab.pre)
        vocab.pre = "llama-bpe"
    vocab.add_bos = bool(meta.get(Keys.Tokenizer.ADD_BOS, True))
    tokenizer_json, tokenizer_config = tokenizer_from_vocab(vocab)
    tokenizer_config["model_max_length"] = t.max_position_embeddings
    extra_eos = meta.get(Keys.Tokenizer.EOS_ID + "s")     # tokenizer.ggml.eos_token_ids (generation_config)
    eos = [vocab.eos_id] if vocab.eos_id is not None else []
    if isinstance(extra_eos, np.ndarray) and extra_eos.dtype.kind in "iu":
        eos += [int(i) for i in extra_eos if 0 <= int(i) < len(vocab.tokens) and int(i) not in eos]
    raw["text_config"].update(bos_token_id=vocab.bos_id, pad_token_id=vocab.pad_id,
                              eos_token_id=eos[0] if len(eos) == 1 else (eos or None))
    preprocessor = {
        "image_processor_type": "MllamaImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"height": v.image_size, "width": v.image_size}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "do_pad": True, "max_image_tiles": v.max_num_tiles,
    }
    return HFCheckpoint(raw, tensors, tokenizer_json, tokenizer_config, preprocessor)


def _hf_config(gf: GGUFFile | SplitGGUF, dtype: torch.dtype) -> dict[str, Any]:
    """MllamaConfig (transformers 5's keys) from the mllama.* metadata, cross-checked with the tensor shapes."""
    meta, names, a = gf.metadata, gf.tensors, ARCH
    for required in ("token_embd.weight", "output.weight", "v.patch_embd.weight", "mm.0.weight"):
        if required not in names:
            raise WeightsError(f"{gf.path}: tensor {required} is missing from an mllama model")
    embed, out, patch, proj = (names[n].shape for n in ("token_embd.weight", "output.weight",
                                                         "v.patch_embd.weight", "mm.0.weight"))
    if len(embed) != 2 or len(out) != 2 or len(patch) != 4 or len(proj) != 2:
        raise WeightsError(f"{gf.path}: token_embd / output / v.patch_embd / mm.0 weights have the wrong rank")
    vocab, hidden = out
    if tuple(embed) != (vocab + 8, hidden):
        raise WeightsError(f"{gf.path}: token_embd.weight has shape {list(embed)}; an mllama model embeds the "
                           f"{vocab}-token vocabulary of output.weight plus 8 rows ({vocab + 8}, {hidden})")
    layers = meta_int(meta, f"{a}.block_count", hi=1 << 12)
    if meta_int(meta, f"{a}.embedding_length", hidden, hi=1 << 20) != hidden:
        raise WeightsError(f"{gf.path}: {a}.embedding_length disagrees with output.weight")
    heads = meta_int(meta, f"{a}.attention.head_count", hi=1 << 12)
    cross = meta.get(f"{a}.attention.cross_attention_layers")
    if not isinstance(cross, np.ndarray) or cross.dtype.kind not in "iu" or cross.ndim != 1:
        raise WeightsError(f"{gf.path}: {a}.attention.cross_attention_layers is missing or not an integer array")
    if hidden % heads:
        raise WeightsError(f"{gf.path}: width {hidden} is not a multiple of {heads} heads")
    head_dim = hidden // heads
    if meta_int(meta, f"{a}.rope.dimension_count", head_dim, hi=1 << 16) != head_dim:
        raise UnsupportedModelError(f"{gf.path}: partial rotary embeddings are not supported")
    ffn_name = next((f"blk.{i}.ffn_up.weight" for i in range(layers) if f"blk.{i}.ffn_up.weight" in names), None)
    ffn = names[ffn_name].shape[0] if ffn_name else 0
    text = {
        "model_type": "mllama_text_model",
        "vocab_size": meta_int(meta, f"{a}.vocab_size", vocab, hi=1 << 24),
        "hidden_size": hidden,
        "intermediate_size": meta_int(meta, f"{a}.feed_forward_length", ffn or None, hi=1 << 20),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": meta_int(meta, f"{a}.attention.head_count_kv", heads, hi=heads),
        "cross_attention_layers": [int(i) for i in cross],
        "max_position_embeddings": meta_int(meta, f"{a}.context_length", 131072),
        "rms_norm_eps": meta_float(meta, f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_parameters": _rope_parameters(gf, a, head_dim),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }
    if text["vocab_size"] != vocab:
        raise WeightsError(f"{gf.path}: {a}.vocab_size {text['vocab_size']} disagrees with output.weight ({vocab})")
    if ffn and text["intermediate_size"] != ffn:
        raise WeightsError(f"{gf.path}: {a}.feed_forward_length disagrees with {ffn_name}")
    width, channels, p, p2 = patch
    vkey = f"{a}.vision"
    inter = meta.get(f"{vkey}.intermediate_layers_indices")
    if not isinstance(inter, np.ndarray) or inter.dtype.kind not in "iu" or inter.ndim != 1:
        raise WeightsError(f"{gf.path}: {vkey}.intermediate_layers_indices is missing or not an integer array")
    tiles = meta_int(meta, f"{vkey}.max_num_tiles", hi=64)
    vision = {
        "model_type": "mllama_vision_model",
        "hidden_size": meta_int(meta, f"{vkey}.embedding_length", width, hi=1 << 16),
        "num_hidden_layers": meta_int(meta, f"{vkey}.block_count", hi=1 << 12),
        "num_global_layers": meta_int(meta, f"{vkey}.global.block_count", hi=1 << 12),
        "attention_heads": meta_int(meta, f"{vkey}.attention.head_count", hi=1 << 12),
        "intermediate_size": meta_int(meta, f"{vkey}.feed_forward_length", hi=1 << 20),
        "intermediate_layers_indices": [int(i) for i in inter],
        "vision_output_dim": width * (1 + len(inter)),
        "image_size": meta_int(meta, f"{vkey}.image_size", hi=1 << 15),
        "patch_size": meta_int(meta, f"{vkey}.patch_size", p, hi=1 << 12),
        "num_channels": meta_int(meta, f"{vkey}.num_channels", channels, hi=16),
        "max_num_tiles": tiles,
        "norm_eps": meta_float(meta, f"{vkey}.attention.layer_norm_epsilon", 1e-5),
        "hidden_act": "gelu",
        # process_image.go supportedAspectRatios: w outer, h inner, w * h <= max tiles (HF's order)
        "supported_aspect_ratios": [[w, h] for w in range(1, tiles + 1) for h in range(1, tiles // w + 1)],
    }
    if vision["hidden_size"] != width or vision["patch_size"] != p or p != p2 or channels != vision["num_channels"]:
        raise WeightsError(f"{gf.path}: {vkey}.* disagrees with v.patch_embd.weight {list(patch)}")
    if tuple(proj) != (hidden, vision["vision_output_dim"]):
        raise WeightsError(f"{gf.path}: mm.0.weight has shape {list(proj)}, but a tower of width {width} with "
                           f"{len(inter)} intermediate layers projects {vision['vision_output_dim']} -> {hidden}")
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": ARCH, "text_config": text,
            "vision_config": vision, "dtype": str(dtype).removeprefix("torch."),
            **({"_name_or_path": meta[Keys.General.NAME]} if isinstance(meta.get(Keys.General.NAME), str) else {})}


def _atanh(stored: torch.Tensor) -> torch.Tensor:
    """g from tanh(g): float64, clipped inside (-1, 1) so a saturated gate stays finite (tanh gives back +-1)."""
    return torch.atanh(stored.to(torch.float64).clamp(-1 + 1e-7, 1 - 1e-7))


def _atanh_tensor(gf: GGUFFile | SplitGGUF, name: str, dtype: torch.dtype) -> torch.Tensor:
    stored = gf.tensor(name, torch.float32)
    if (stored.abs() > 1).any():
        raise WeightsError(f"{gf.path}: {name} holds {stored.tolist()}, not tanh of a gate (outside [-1, 1])")
    return _atanh(stored).to(dtype)


def _gated_position_gate(gf: GGUFFile | SplitGGUF, dtype: torch.dtype) -> torch.Tensor:
    """The gated position embedding's gate, stored twice: 1 - tanh(g) and tanh(g)."""
    tile, position = gf.tensor(TILE_GATE, torch.float32), gf.tensor(POSITION_GATE, torch.float32)
    if (tile.abs() > 1).any() or not torch.allclose(position, 1 - tile, atol=1e-3):
        raise WeightsError(f"{gf.path}: {POSITION_GATE} {position.tolist()} and {TILE_GATE} {tile.tolist()} are not "
                           f"1 - tanh(g) and tanh(g) of one gate")
    return _atanh(tile).to(dtype)


# --- writing (what convert_mllama.go writes) ---------------------------------------------
def write_gguf(ckpt: HFCheckpoint, out: Path, *, type: str, head_type: str | None = None,  # noqa: A002
               stem: str = "model") -> tuple[Path, None]:
    """The mllama GGUF Ollama's converter makes of this checkpoint (`type` f16, as Ollama writes it, or
    f32); one file, no projector."""
    if type not in ("f16", "f32"):
        raise ConfigError(f"an mllama model is exported as Ollama's converter writes it, f16 or f32, not {type!r} "
                          f"(Ollama quantizes afterwards, in `ollama create -q`)")
    path = Path(out) / f"{stem}-{type.upper()}.gguf"
    write_ollama_mllama(ckpt, path, float_type=Q.F32 if type == "f32" else Q.F16)
    return path, None


def write_ollama_mllama(ckpt: HFCheckpoint, path: str | Path, *, float_type: Q = Q.F16) -> Path:
    from . import family as F
    raw = ckpt.config
    cfg = F.config(raw)                     # refuses a config the family cannot run
    t, v = cfg.text, cfg.vision
    text = raw.get("text_config") or {}
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = float(text.get("rope_theta", rope.get("rope_theta", 500000.0)))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "llama3"):
        raise UnsupportedModelError(f"RoPE {kind!r}: Ollama's mllama converter writes default or llama3 RoPE only")

    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    writer.add_uint32(Keys.General.FILE_TYPE, int(LlamaFileType.ALL_F32 if float_type == Q.F32
                                                  else LlamaFileType.MOSTLY_F16))
    writer.add_uint32(Keys.General.QUANTIZATION_VERSION, 2)
    if raw.get("_name_or_path"):
        writer.add_name(str(raw["_name_or_path"]))
    _write_vocabulary(writer, ckpt)
    a = ARCH
    writer.add_uint32(f"{a}.vocab_size", t.vocab_size)
    writer.add_uint32(f"{a}.block_count", t.num_hidden_layers)
    writer.add_uint32(f"{a}.context_length", t.max_position_embeddings)
    writer.add_uint32(f"{a}.embedding_length", t.hidden_size)
    writer.add_uint32(f"{a}.feed_forward_length", t.intermediate_size)
    writer.add_uint32(f"{a}.attention.head_count", t.num_attention_heads)
    writer.add_uint32(f"{a}.rope.dimension_count", t.hidden_size // t.num_attention_heads)
    writer.add_float32(f"{a}.rope.freq_base", theta)
    writer.add_uint32(f"{a}.attention.head_count_kv", t.num_key_value_heads)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", t.rms_norm_eps)
    writer.add_array(f"{a}.attention.cross_attention_layers", [int(i) for i in cfg.cross_attention_layers])
    writer.add_uint32(f"{a}.vision.block_count", v.num_hidden_layers)
    writer.add_uint32(f"{a}.vision.global.block_count", v.num_global_layers)
    writer.add_array(f"{a}.vision.intermediate_layers_indices", [int(i) for i in v.intermediate_layers_indices])
    writer.add_uint32(f"{a}.vision.embedding_length", v.hidden_size)
    writer.add_uint32(f"{a}.vision.feed_forward_length", v.intermediate_size)
    writer.add_uint32(f"{a}.vision.attention.head_count", v.attention_heads)
    writer.add_float32(f"{a}.vision.attention.layer_norm_epsilon", v.norm_eps)
    writer.add_uint32(f"{a}.vision.image_size", v.image_size)
    writer.add_uint32(f"{a}.vision.patch_size", v.patch_size)
    writer.add_uint32(f"{a}.vision.max_num_tiles", v.max_num_tiles)
    writer.add_uint32(f"{a}.vision.num_channels", v.num_channels)

    def planned(name: str, tensor: torch.Tensor, bf16: bool = False) -> Planned:
        f32 = tensor.dim() == 1 or name.endswith(".bias") or name in F32_NAMES or float_type == Q.F32
        if f32:
            return Planned(name, tensor.contiguous(), Q.F32)
        if bf16 and not name.startswith(("v.", "mm.")):     # reader_safetensors.go keeps a BF16 text tensor BF16
            return Planned(name, tensor.contiguous(), Q.BF16)
        return Planned(name, tensor.contiguous(), tensor_type(float_type, tensor))

    tensors = {hub_name(k): val for k, val in ckpt.tensors.items()}
    vision_plan, text_plan = [], []
    if kind == "llama3":
        factors = llama3_rope_factors({**rope, "rope_theta": theta}, t.hidden_size // t.num_attention_heads)
        text_plan.append(Planned("rope_freqs.weight", torch.from_numpy(factors.astype(np.float32)), Q.F32))
    for hf, tensor in tensors.items():
        name = ollama_name(hf)
        bf16 = tensor.dtype == torch.bfloat16
        tensor = tensor.detach().to(torch.float32)
        if name == POSITION_GATE:
            vision_plan += [planned(POSITION_GATE, 1 - torch.tanh(tensor)), planned(TILE_GATE, torch.tanh(tensor))]
            continue
        if _tanh_stored(name):
            tensor = torch.tanh(tensor)
        heads = _qk_heads(name, t.num_attention_heads, t.num_key_value_heads, v.attention_heads)
        if heads is not None:
            tensor = tensor[torch.from_numpy(llama_qk_order(tensor.shape[0], heads))]
        (vision_plan if name.startswith(("v.", "mm.")) else text_plan).append(planned(name, tensor, bf16))
    write_tensors(writer, Path(path), vision_plan + text_plan)
    return Path(path)


def _write_vocabulary(writer: gguf.GGUFWriter, ckpt: HFCheckpoint) -> None:
    """tokenizer.ggml.* as convert/tokenizer.go writes a tokenizer.json vocabulary."""
    try:
        spec = json.loads(ckpt.tokenizer_json)
        vocab, merges = spec["model"]["vocab"], spec["model"].get("merges") or []
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"tokenizer.json is not a tokenizers BPE file: {e}") from e
    tokens = {i: (t, None) for t, i in vocab.items()}
    for added in spec.get("added_tokens") or []:
        tokens[int(added["id"])] = (added["content"], bool(added.get("special")))
    ids = sorted(tokens)
    types = [_TOKEN_NORMAL if tokens[i][1] is None else _TOKEN_CONTROL if tokens[i][1] else _TOKEN_USER for i in ids]
    pre = spec.get("pre_tokenizer") or {}
    digest = hashlib.sha256()
    for step in pre.get("pretokenizers") or []:
        if step.get("type") == "Split" and (step.get("pattern") or {}).get("Regex"):
            digest.update(step["pattern"]["Regex"].encode())
    writer.add_tokenizer_pre(PRE_BY_DIGEST.get(digest.hexdigest(), "default"))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([tokens[i][0] for i in ids])
    writer.add_token_scores([float(i) for i in ids])
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    tc = ckpt.tokenizer_config or {}
    template = tc.get("chat_template")
    if isinstance(template, list):
        template = next((e.get("template") for e in template if e.get("name") == "default"), None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    by_content = {tokens[i][0]: i for i in ids if tokens[i][1] is not None}
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        content = tc.get(f"{kind}_token")
        content = content.get("content") if isinstance(content, dict) else content
        if content not in by_content:       # tokenizer.go keeps only tokens listed in added_tokens
            continue
        if isinstance(tc.get(f"add_{kind}_token"), bool):
            writer.add_bool(f"tokenizer.ggml.add_{key}_token", tc[f"add_{kind}_token"])
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", by_content[content])


__all__ = ["ARCH", "DECODER", "REPLACEMENTS", "ollama_name", "read_gguf_file", "write_gguf", "write_ollama_mllama"]
