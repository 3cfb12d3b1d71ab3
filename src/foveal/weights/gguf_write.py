"""Writing GGUF: an HFCheckpoint as llama.cpp's text model file plus its LLaVA mmproj file.

Design decisions
- Mirrors llama.cpp's own converters, so llama.cpp and Ollama load the files:
  convert_hf_to_gguf.py for the text model (LlamaModel / Qwen2Model metadata, the q/k row
  permutation for llama, tokenizer.ggml.*, rope_freqs for Llama 3.1 scaling) and the LLaVA
  image-encoder converter for the mmproj (clip.* keys), with today's tensor names
  (fc1 -> ffn_up) and an explicit `clip.vision.feature_layer`.
- Tensor types as llama.cpp picks them: 1-D tensors (norms, biases, class embedding) stay F32;
  2-D weights take the requested type, falling back to F16 when a row is not whole blocks.
  The output head (or the tied embedding that serves as one) is kept in a higher-precision
  type, as llama-quantize keeps `output` (Q6_K/Q8_0 for its 4-bit types; `--leave-output-tensor`):
  F16 under q8_0, Q8_0 under q4_0; `head_type=` (CLI `--head-type`, like llama-quantize's
  `--output-tensor-type`) picks another. Measured on the bundled model (70 held-out questions,
  identical greedy answers to float32): Q8_0 with the head in F16 100 %, with the head in Q8_0
  97.1 %; the cost is ~1 byte more per head weight (Qwen2-0.5B: +128 MB on 0.5 GB).
  A weight that overflows F16 stays F32. The mmproj is F16 (F32 when the text model is F32).
- The mmproj keeps only the vision layers the features need, as llama.cpp's LLaVA converter
  does, and names the feature layer, so every llama.cpp version runs exactly those layers.
- Streaming: all tensor infos first, then each tensor converted, quantized and written in
  turn, so at most one converted tensor is in memory. Files appear atomically (.part, rename).
- A family that owns its GGUF mapping (models.registry.GGUF_ARCHITECTURES) writes its own pair
  through `write_text_model` (the llama / qwen2 decoder under its llama.cpp architecture, plus
  its keys) and `write_tensors`; the dispatch is one lookup by the config's family.
- `read_hf_folder` (the export's input) accepts every LLaVA checkpoint layout foveal meets and
  normalises it to the legacy llava-hf names: legacy, transformers v5 (`model.language_model.*`)
  and transformers 5.2x's save_pretrained mix (`vision_tower.embeddings.*`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, LlamaFileType, RopeScalingType

from foveal.errors import ConfigError, UnsupportedModelError, WeightsError
from foveal.models.registry import GGUF_ARCHITECTURES, gguf_family_for
from foveal.weights.gguf import (
    IMAGE_NEWLINE, LLAVA_TEXT_PREFIX, LLAVA_VISION_PREFIX, PROJECTOR_NAMES, TEXT_BLOCK_NAMES,
    TEXT_GLOBAL_NAMES, VISION_BLOCK_NAMES, VISION_GLOBAL_NAMES, HFCheckpoint,
    llama3_rope_factors, llama_qk_order,
)
from foveal.processing.anyres import LLAVA_NEXT_PINPOINTS
from foveal.weights.gguf_tokenizer import vocab_from_tokenizer

log = logging.getLogger(__name__)

FILE_TYPES = {  # --type -> (2-D weight type, general.file_type)
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
_TEXT_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # HF model_type -> GGUF arch
_F16_MAX = 65504.0


@dataclass
class Planned:
    name: str
    tensor: torch.Tensor  # HF layout, rows already in GGUF order
    qtype: Q


# --- HF folders (what `foveal export` reads) ---------------------------------------------
# Checkpoint layouts, normalised to the legacy llava-hf names. Order matters: the first
# matching prefix wins.
_LLAVA_PREFIX_RENAMES = {
    "model.language_model.": "language_model.model.",  # transformers >= 4.52 / v5
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "model.image_newline": "image_newline",
    "lm_head.": "language_model.lm_head.",
}
_SKIPPED_BUFFERS = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq)$")


def normalise_llava_name(name: str) -> str:
    """Map any of the LLaVA checkpoint layouts foveal meets to the legacy llava-hf name."""
    for prefix, legacy in _LLAVA_PREFIX_RENAMES.items():
        if name.startswith(prefix):
            name = legacy + name[len(prefix):]
            break
    # transformers 5.2x's save_pretrained writes the tower without `vision_model.`
    if name.startswith("vision_tower.") and not name.startswith(LLAVA_VISION_PREFIX):
        name = LLAVA_VISION_PREFIX + name[len("vision_tower."):]
    return name


def read_hf_folder(path: str | Path) -> HFCheckpoint:
    """Read an HF folder (config, safetensors shards, tokenizer, chat template, image
    processor config) into an HFCheckpoint with legacy llava-hf tensor names."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    config = _read_json(folder / "config.json", required=True)
    index = _read_json(folder / "model.safetensors.index.json", required=False)
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{folder / 'model.safetensors.index.json'} has no weight_map")
        files = sorted({str(v) for v in weight_map.values()})
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder} holds no *.safetensors weights")

    is_llava = config.get("model_type") in ("llava", "llava_next")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        shard = folder / file
        if not shard.is_file():
            raise WeightsError(f"{shard} is listed in the index but missing")
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    if _SKIPPED_BUFFERS.search(key):
                        continue
                    name = normalise_llava_name(key) if is_llava else key
                    if name in tensors:
                        raise WeightsError(f"tensor {key!r} appears twice in {folder}")
                    tensors[name] = f.get_tensor(key)
        except SafetensorError as e:
            raise WeightsError(f"{shard} is not a readable safetensors file: {e}") from e

    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise WeightsError(f"{folder} has no tokenizer.json (needed to write tokenizer.ggml.*)")
    tokenizer_config = _read_json(folder / "tokenizer_config.json", required=False) or {}
    special_map = _read_json(folder / "special_tokens_map.json", required=False) or {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = tokenizer_config.get(key, special_map.get(key))
        if isinstance(value, dict):  # AddedToken as saved: {"content": "<s>", ...}
            value = value.get("content")
        tokenizer_config[key] = value
    template = _find_chat_template(folder, tokenizer_config)
    if template is not None:
        tokenizer_config["chat_template"] = template
    return HFCheckpoint(
        config=config,
        tensors=tensors,
        tokenizer_json=tokenizer_file.read_text(encoding="utf-8"),
        tokenizer_config=tokenizer_config,
        preprocessor_config=_read_json(folder / "preprocessor_config.json", required=False),
    )


def _find_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> Any:
    # Lookup order of transformers: chat_template.jinja, chat_template.json, tokenizer_config.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = _read_json(folder / "chat_template.json", required=False)
    if as_json is not None and "chat_template" in as_json:
        return as_json["chat_template"]
    return tokenizer_config.get("chat_template")


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise WeightsError(f"{path} is missing")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path} does not hold a JSON object")
    return data


# --- writing -----------------------------------------------------------------------------
# --type -> the output head's type when head_type is not given
DEFAULT_HEAD_TYPES = {"f32": "f32", "f16": "f16", "q8_0": "f16", "q4_0": "q8_0"}


def write_gguf(ckpt: HFCheckpoint, out_dir: str | Path, *, type: str,  # noqa: A002
               head_type: str | None = None) -> tuple[Path, Path | None]:
    if type not in FILE_TYPES:
        raise ConfigError(f"unknown GGUF type {type!r}; choose one of {', '.join(FILE_TYPES)}")
    if head_type is not None and head_type not in FILE_TYPES:
        raise ConfigError(f"unknown head type {head_type!r}; choose one of {', '.join(FILE_TYPES)}")
    head_type = head_type or DEFAULT_HEAD_TYPES[type]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = ckpt.config
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(config.get("_name_or_path") or "model")).name) or "model"
    family = gguf_family_for(config)   # a family that owns its GGUF mapping (registry.GGUF_ARCHITECTURES)
    if family is not None:
        return family.write_gguf(ckpt, out, type=type, head_type=head_type, stem=stem)
    if ckpt.is_vlm:
        text_config = config.get("text_config") or {}
        text_tensors = {k[len(LLAVA_TEXT_PREFIX):]: v for k, v in ckpt.tensors.items()
                        if k.startswith(LLAVA_TEXT_PREFIX)}
    elif config.get("model_type") in _TEXT_ARCH:
        text_config, text_tensors = config, ckpt.tensors
    else:
        raise UnsupportedModelError(
            f"model_type {config.get('model_type')!r} cannot be exported to GGUF "
            f"(supported: llava, llava_next, {', '.join(_TEXT_ARCH)}, "
            f"{', '.join(sorted(set(GGUF_ARCHITECTURES.values())))})"
        )
    text_path = out / f"{stem}-{type.upper()}.gguf"
    write_text_model(text_path, text_config, text_tensors, ckpt, type, stem, head_type)
    if not ckpt.is_vlm:
        return text_path, None
    mmproj_path = out / f"mmproj-{stem}-{'F32' if type == 'f32' else 'F16'}.gguf"
    _write_mmproj(mmproj_path, ckpt, Q.F32 if type == "f32" else Q.F16, stem)
    return text_path, mmproj_path


# --- text model --------------------------------------------------------------------------
def write_text_model(
    path: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], ckpt: HFCheckpoint, type: str, name: str,  # noqa: A002
    head_type: str, *, arch: str | None = None, add_metadata: Callable[[gguf.GGUFWriter], None] | None = None,
) -> None:
    """The text model file of a llama / qwen2 decoder (`cfg`: its HF text config, `tensors`: `model.*`
    and `lm_head.weight`). A family module whose decoder is one of these under another llama.cpp
    architecture passes `arch` (qwen2vl) and writes its own keys in `add_metadata`."""
    model_type = cfg.get("model_type", "llama")
    layout = _TEXT_ARCH.get(model_type)
    if layout is None:
        raise UnsupportedModelError(f"text model_type {model_type!r} cannot be exported to GGUF")
    arch = arch or layout
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"llama.cpp's {arch} graph needs a bias-free SiLU-gated MLP")
    embed = need(tensors, "model.embed_tokens.weight")
    vocab_size, hidden = embed.shape
    layers = sorted({int(m[1]) for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))})
    if layers != list(range(len(layers))) or not layers:
        raise WeightsError("the language model's layers are missing or not numbered 0..N-1")
    n_layers = len(layers)
    # absent keys take the HF class defaults (LlamaConfig / Qwen2Config)
    heads = int(cfg.get("num_attention_heads", 32))
    kv_heads = int(cfg.get("num_key_value_heads") or (heads if layout == "llama" else 32))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    ffn = need(tensors, "model.layers.0.mlp.up_proj.weight").shape[0]
    expect_shape(tensors, "model.layers.0.self_attn.q_proj.weight", (heads * head_dim, hidden))
    expect_shape(tensors, "model.layers.0.self_attn.k_proj.weight", (kv_heads * head_dim, hidden))
    if layout == "qwen2":  # llama.cpp's qwen2 graph requires the q/k/v biases
        for proj in ("q_proj", "k_proj", "v_proj"):
            need(tensors, f"model.layers.0.self_attn.{proj}.bias")
    if cfg.get("num_hidden_layers", n_layers) != n_layers or cfg.get("vocab_size", vocab_size) != vocab_size:
        raise WeightsError("config.json's layer count or vocabulary size disagrees with the weights")
    tied = bool(cfg.get("tie_word_embeddings", ckpt.config.get("tie_word_embeddings", False)))
    if not tied and "lm_head.weight" not in tensors:
        raise WeightsError("lm_head.weight is missing and the config does not tie it to the embeddings")

    weight_type, file_type = FILE_TYPES[type]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if layout == "llama":
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(head_dim)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048 if layout == "llama" else 32768)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    rope = _rope_parameters(cfg)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_freqs = _add_rope_scaling(writer, rope, head_dim)
    if add_metadata is not None:
        add_metadata(writer)

    image_token = ckpt.config.get("image_token_index") if ckpt.is_vlm else None
    placeholder = image_token if isinstance(image_token, int) and image_token >= vocab_size else None
    add_vocab(writer, ckpt, vocab_size, placeholder=placeholder)

    def text_type(gguf_name: str, tensor: torch.Tensor) -> Q:
        if tensor.dim() == 1:
            return Q.F32
        is_head = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        return tensor_type(FILE_TYPES[head_type][0] if is_head else weight_type, tensor)

    orders = {}
    if layout == "llama":  # llama.cpp rotates interleaved pairs: permute q/k rows (and biases)
        orders = {"attn_q": llama_qk_order(heads * head_dim, heads),
                  "attn_k": llama_qk_order(kv_heads * head_dim, kv_heads)}
    plan = []
    for gguf_name, hf in TEXT_GLOBAL_NAMES.items():
        if gguf_name == "output" and tied:
            continue
        tensor = need(tensors, f"{hf}.weight")
        plan.append(Planned(f"{gguf_name}.weight", tensor, text_type(f"{gguf_name}.weight", tensor)))
    for i in range(n_layers):
        for key, hf in TEXT_BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                hf_name = f"model.layers.{i}.{hf}.{kind}"
                if kind == "weight" or hf_name in tensors:
                    tensor = need(tensors, hf_name)
                    if key in orders:
                        tensor = tensor[torch.from_numpy(orders[key])]
                    plan.append(Planned(f"blk.{i}.{key}.{kind}", tensor, text_type(key, tensor)))
    if rope_freqs is not None:
        plan.append(Planned("rope_freqs.weight", torch.from_numpy(rope_freqs), Q.F32))
    write_tensors(writer, path, plan)


def add_vocab(writer: gguf.GGUFWriter, ckpt: HFCheckpoint, vocab_size: int, *, placeholder: int | None = None) -> None:
    """tokenizer.ggml.* and the chat template for `ckpt`'s tokenizer, padded to `vocab_size` rows (a family
    module writing its own text model calls this too)."""
    vocab = vocab_from_tokenizer(ckpt.tokenizer_json, ckpt.tokenizer_config, vocab_size, placeholder=placeholder)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    elif vocab.model == "gpt2":      # gguf cannot write an empty array, and no reader takes the file without
        raise WeightsError("the tokenizer is a byte-level BPE without merges: a GGUF needs tokenizer.ggml.merges "
                           "(llama.cpp refuses the file: \"cannot find tokenizer merges in model file\"); "
                           "export a model whose tokenizer has at least one merge")
    for add_id, token_id in ((writer.add_bos_token_id, vocab.bos_id), (writer.add_eos_token_id, vocab.eos_id),
                             (writer.add_unk_token_id, vocab.unk_id), (writer.add_pad_token_id, vocab.pad_id)):
        if token_id is not None:
            add_id(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers v5 `rope_parameters`, or the v4 `rope_theta` + `rope_scaling` pair."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def _add_rope_scaling(writer: gguf.GGUFWriter, rope: dict[str, Any], head_dim: int) -> np.ndarray | None:
    kind = rope["rope_type"]
    if kind == "default":
        return None
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return None
    if kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):
            if rope.get(key) is not None:
                add(float(rope[key]))
        return None
    if kind == "llama3":  # llama.cpp applies these per-frequency factors (rope_freqs tensor)
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        return llama3_rope_factors(rope, head_dim).astype(np.float32)
    raise UnsupportedModelError(f"RoPE scaling {kind!r} has no llama.cpp equivalent in foveal's export")


# --- mmproj ------------------------------------------------------------------------------
_VISION_DEFAULTS = {  # HF class defaults for what sparse vision configs leave out
    "clip_vision_model": {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "image_size": 224,
                          "patch_size": 32, "num_attention_heads": 12},
    "siglip_vision_model": {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                            "image_size": 224, "patch_size": 16, "num_attention_heads": 12},
}


def _write_mmproj(path: Path, ckpt: HFCheckpoint, float_type: Q, name: str) -> None:
    config = ckpt.config
    vcfg = dict(config.get("vision_config") or {})
    kind = vcfg.get("model_type", "clip_vision_model")
    if kind not in _VISION_DEFAULTS:
        raise UnsupportedModelError(f"vision tower {kind!r} cannot be exported to a llama.cpp mmproj")
    vcfg = {**_VISION_DEFAULTS[kind], **vcfg}
    siglip = kind == "siglip_vision_model"
    tensors = {k[len(LLAVA_VISION_PREFIX):]: v for k, v in ckpt.tensors.items() if k.startswith(LLAVA_VISION_PREFIX)}
    n_layers = len({int(m[1]) for k in tensors if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    patch = need(tensors, "embeddings.patch_embedding.weight")
    width = patch.shape[0]

    # which hidden states the projector reads; llama.cpp wants them non-negative and ascending
    feature = config.get("vision_feature_layer", -2)
    layers = [feature] if isinstance(feature, int) else list(feature)
    layers = [f if f >= 0 else n_layers + f + 1 for f in layers]
    if not layers or layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] <= n_layers:
        raise UnsupportedModelError(f"vision_feature_layer {feature!r} has no llama.cpp equivalent")
    keep = layers[-1]
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != ("full" if siglip else "default"):
        raise UnsupportedModelError(
            f"llama.cpp keeps every patch of a SigLIP tower and drops CLIP's class token; "
            f"vision_feature_select_strategy {strategy!r} does not match"
        )
    act = vcfg["hidden_act"]
    if act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu") or (act == "quick_gelu" and siglip):
        raise UnsupportedModelError(f"vision activation {act!r} has no llama.cpp equivalent")
    if config.get("projector_hidden_act", "gelu") not in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        raise UnsupportedModelError("llama.cpp's LLaVA projector is Linear-GELU-Linear")
    text_width = need(ckpt.tensors, "multi_modal_projector.linear_2.weight").shape[0]
    processor = ckpt.preprocessor_config or {}
    mean = processor.get("image_mean") or ([0.5] * 3 if siglip else [0.48145466, 0.4578275, 0.40821073])
    std = processor.get("image_std") or ([0.5] * 3 if siglip else [0.26862954, 0.26130258, 0.27577711])

    writer = gguf.GGUFWriter(path=None, arch="clip")
    writer.add_name(name)
    writer.add_description("image encoder for LLaVA")
    writer.add_file_type(int(LlamaFileType.ALL_F32 if float_type == Q.F32 else LlamaFileType.MOSTLY_F16))
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_clip_has_vision_encoder(True)
    writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_image_size(int(vcfg["image_size"]))
    writer.add_vision_patch_size(int(vcfg["patch_size"]))
    writer.add_vision_embedding_length(width)
    writer.add_vision_feed_forward_length(need(tensors, "encoder.layers.0.mlp.fc1.weight").shape[0])
    writer.add_vision_projection_dim(text_width)
    writer.add_vision_block_count(keep)
    writer.add_vision_head_count(int(vcfg["num_attention_heads"]))
    writer.add_vision_attention_layernorm_eps(float(vcfg["layer_norm_eps"]))
    writer.add_vision_image_mean([float(v) for v in mean])
    writer.add_vision_image_std([float(v) for v in std])
    writer.add_vision_use_gelu(act in ("gelu", "gelu_pytorch_tanh"))
    writer.add_vision_use_silu(act == "silu")
    writer.add_array("clip.vision.feature_layer", layers)
    pinpoints = None
    if config.get("model_type") == "llava_next":    # a sparse config.json takes LlavaNextConfig's default
        pinpoints = config.get("image_grid_pinpoints")
        pinpoints = LLAVA_NEXT_PINPOINTS if pinpoints is None else pinpoints
    if pinpoints is not None:   # LLaVA-1.6 anyres, as llama.cpp's llava-1.6 surgery writes it
        newline = need(ckpt.tensors, "image_newline")
        writer.add_array("clip.vision.image_grid_pinpoints", [int(x) for p in pinpoints for x in p])
        writer.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")
        writer.add_string("clip.vision.image_aspect_ratio", "anyres")
        writer.add_uint32("clip.vision.image_crop_resolution", int(vcfg["image_size"]))

    def vision_type(tensor: torch.Tensor) -> Q:
        return Q.F32 if tensor.dim() == 1 else tensor_type(float_type, tensor)

    plan = []
    for gguf_name, hf in VISION_GLOBAL_NAMES.items():
        if gguf_name.startswith("v.post_ln"):
            continue  # llama.cpp would apply it to the features; LLaVA never does
        if hf in tensors:
            plan.append(Planned(gguf_name, tensors[hf], vision_type(tensors[hf])))
    for i in range(keep):
        for key, hf in VISION_BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                if (tensor := tensors.get(f"encoder.layers.{i}.{hf}.{kind}")) is not None:
                    plan.append(Planned(f"v.blk.{i}.{key}.{kind}", tensor, vision_type(tensor)))
    for gguf_name, hf in PROJECTOR_NAMES.items():
        weight = need(ckpt.tensors, f"{hf}.weight")
        bias = ckpt.tensors.get(f"{hf}.bias")
        plan.append(Planned(f"{gguf_name}.weight", weight, vision_type(weight)))
        # llama.cpp's projector always adds a bias
        plan.append(Planned(f"{gguf_name}.bias", bias if bias is not None else torch.zeros(weight.shape[0]), Q.F32))
    if pinpoints is not None:
        plan.append(Planned(IMAGE_NEWLINE, newline, Q.F32))
    write_tensors(writer, path, plan)


# --- shared ------------------------------------------------------------------------------
def tensor_type(wanted: Q, tensor: torch.Tensor) -> Q:
    if wanted in (Q.Q8_0, Q.Q4_0) and tensor.shape[-1] % GGML_QUANT_SIZES[wanted][0]:
        wanted = Q.F16  # rows must be whole blocks
    if wanted == Q.F16 and tensor.numel() and float(tensor.abs().max()) > _F16_MAX:
        log.warning("a weight exceeds the float16 range; keeping it float32")
        return Q.F32
    return wanted


def write_tensors(writer: gguf.GGUFWriter, path: Path, plan: list[Planned]) -> None:
    for p in plan:
        block, type_size = GGML_QUANT_SIZES[p.qtype]
        shape = tuple(p.tensor.shape)
        if p.qtype == Q.F32:
            writer.add_tensor_info(p.name, shape, np.dtype(np.float32), p.tensor.numel() * 4)
        elif p.qtype == Q.F16:
            writer.add_tensor_info(p.name, shape, np.dtype(np.float16), p.tensor.numel() * 2)
        else:  # quantized: described by its byte shape, as GGUFWriter expects
            byte_shape = (*shape[:-1], shape[-1] // block * type_size)
            writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=p.qtype)
    partial = path.with_name(path.name + ".part")
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plan:
            values = p.tensor.detach().to(torch.float32).contiguous().numpy()
            if p.qtype == Q.F32:
                data = values
            elif p.qtype == Q.F16:
                data = values.astype(np.float16)
            else:
                data = gguf.quants.quantize(values, p.qtype)
            writer.write_tensor_data(data)
            del values, data
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def need(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise WeightsError(f"the checkpoint lacks {name}")
    return tensors[name]


def expect_shape(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> None:
    if tuple(need(tensors, name).shape) != shape:
        raise WeightsError(f"{name} has shape {list(tensors[name].shape)}, the config implies {list(shape)}")
