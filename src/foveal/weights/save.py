"""Write a model as an HF-format checkpoint folder that foveal and transformers both load.

Design decisions:
- Tensors are saved under llava-hf's legacy names (`language_model.model.*`,
  `vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.lm_head.weight`),
  the layout every transformers release reads; a text-only model under `model.*` / `lm_head.*`.
- The config is written in full (no reliance on class defaults), with both `rope_theta` and
  `rope_parameters` so transformers 4.x and 5.x read the same RoPE.
- A tied head is not written twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import VLMConfig


def rope_to_hf(cfg: VLMConfig) -> dict:
    r = cfg.text.rope
    out = {"rope_theta": r.theta}
    if r.kind == "default":
        params = {"rope_type": "default", "rope_theta": r.theta}
        scaling = None
    else:
        scaling = {"rope_type": r.kind, "factor": r.factor}
        if r.kind == "llama3":
            scaling |= {"low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor,
                        "original_max_position_embeddings": r.original_max_position_embeddings}
        params = scaling | {"rope_theta": r.theta}
    out["rope_parameters"] = params
    if scaling:
        out["rope_scaling"] = scaling
    return out


def text_config_to_hf(cfg: VLMConfig) -> dict:
    t = cfg.text
    eos = t.eos_token_id[0] if len(t.eos_token_id) == 1 else (t.eos_token_id or None)
    d = {
        "model_type": t.model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim, "hidden_act": t.hidden_act, "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps, "tie_word_embeddings": t.tie_word_embeddings,
        "attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias, "bos_token_id": t.bos_token_id,
        "eos_token_id": eos, "pad_token_id": t.pad_token_id,
    }
    if t.model_type == "mistral":
        d["sliding_window"] = t.sliding_window
    if t.model_type == "qwen2":
        d["use_sliding_window"] = False
    return d | rope_to_hf(cfg)


def config_to_hf(cfg: VLMConfig) -> dict:
    text = text_config_to_hf(cfg)
    if cfg.vision is None:
        return {"architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM"}[cfg.text.model_type]]} | text
    v = cfg.vision
    vision = {"model_type": v.model_type, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
              "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
              "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
              "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps}
    anyres = {"image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints]} if cfg.anyres else {}
    return {
        "architectures": ["LlavaNextForConditionalGeneration" if cfg.anyres else "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if cfg.anyres else "llava", **anyres,
        "vision_config": vision, "text_config": text, "image_token_index": cfg.image_token_id,
        "projector_hidden_act": cfg.projector.hidden_act, "multimodal_projector_bias": cfg.projector.bias,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_seq_length": cfg.image_tokens_per_image, "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }


def hf_name(name: str, cfg: VLMConfig) -> str:
    """A LLaVA (or text) model's module name -> the checkpoint name it is saved under."""
    vlm = cfg.vision is not None
    if name.startswith("lm_head."):
        return ("language_model." if vlm else "") + name
    if name.startswith("language_model."):
        return ("language_model.model." if vlm else "model.") + name[len("language_model."):]
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def hf_state_dict(model: torch.nn.Module, cfg, name_of=hf_name) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors of a model (no caches, no RoPE buffers, a tied head once); name_of: the
    family's module name -> checkpoint name map."""
    out = {}
    for name, t in model.state_dict().items():
        if ".kv_cache." in name or name.endswith("inv_freq"):
            continue
        if name == "lm_head.weight" and cfg.text.tie_word_embeddings:
            continue
        out[name_of(name, cfg)] = t.detach().contiguous()
    return out


def save_checkpoint(model: torch.nn.Module, cfg: VLMConfig, folder: Path, *, tokenizer_json: str,
                    tokenizer_config: dict, chat_template: str | None = None,
                    image_processor: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(model, cfg)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    hf = config_to_hf(cfg)
    hf["dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    (folder / "tokenizer.json").write_text(tokenizer_json)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if chat_template:
        (folder / "chat_template.jinja").write_text(chat_template)
    if image_processor:
        (folder / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    if cfg.vision is not None:
        (folder / "processor_config.json").write_text(json.dumps(processor_config(cfg, tokenizer_json), indent=2))
    return folder


def processor_config(cfg: VLMConfig, tokenizer_json: str) -> dict:
    """processor_config.json, as the llava-hf repos ship it: without patch_size, transformers'
    LlavaProcessor / LlavaNextProcessor leave one `<image>` per image instead of expanding it to the
    image's token count, and the model refuses the prompt."""
    token = next((t["content"] for t in json.loads(tokenizer_json).get("added_tokens", [])
                  if t.get("id") == cfg.image_token_id), "<image>")
    return {"processor_class": "LlavaNextProcessor" if cfg.anyres else "LlavaProcessor", "image_token": token,
            "patch_size": cfg.vision.patch_size, "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "num_additional_image_tokens": 0 if cfg.vision.is_siglip else 1}
