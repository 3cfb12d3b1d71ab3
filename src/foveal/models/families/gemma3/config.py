"""Gemma 3's config.json -> the family's config, with transformers 5.25's Gemma3Config / Gemma3TextConfig /
SiglipVisionConfig class defaults for absent keys.

Design decisions:
- The decoder's part is a `TextConfig` (what the engine, the planner and placement read) extended with what
  Gemma 3 adds: per-layer attention kinds (`layer_types`, else the old `sliding_window_pattern`: every
  pattern-th layer global), the window, two RoPEs (`rope_parameters.full_attention` / `sliding_attention`, or
  the old `rope_theta` + `rope_scaling` + `rope_local_base_freq`), `query_pre_attn_scalar`.
- transformers 5.25 applies neither `attn_logit_softcapping` (Gemma3Attention never passes it to an attention
  function) nor `final_logit_softcapping` (only Gemma3ForCausalLM reads it) to Gemma3ForConditionalGeneration:
  foveal runs the model as transformers does and logs that a configured cap is not applied.
- Refused by name: RoPE kinds other than default / linear, a bias on the projections, bidirectional text
  attention (EmbeddingGemma's), an activation other than gelu_pytorch_tanh, an image grid the projector
  cannot pool to `mm_tokens_per_image`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from .... import config as C
from ....errors import ConfigError

log = logging.getLogger(__name__)

NAME = "gemma3"
ARCHITECTURE = "Gemma3ForConditionalGeneration"
# transformers 5.25's Gemma3TextConfig class defaults
TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_act="silu",
                     max_position_embeddings=131_072, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     attention_bias=False, mlp_bias=False, bos_token_id=2, eos_token_id=1, sliding_window=4096)
GEMMA_DEFAULTS = dict(query_pre_attn_scalar=256, sliding_window_pattern=6, hidden_activation="gelu_pytorch_tanh",
                      rope_global_theta=1_000_000.0, rope_local_theta=10_000.0)
# Gemma3Config's (boi / eoi / image token ids of the real 262k vocabulary)
TOKEN_DEFAULTS = dict(mm_tokens_per_image=256, boi_token_index=255_999, eoi_token_index=256_000,
                      image_token_index=262_144)
ROPE_KINDS = ("default", "linear")
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class Gemma3TextConfig(C.TextConfig):
    query_pre_attn_scalar: float = 256
    layer_types: tuple[str, ...] = ()                    # "sliding_attention" | "full_attention", per layer
    local_rope: C.RopeConfig = field(default_factory=lambda: C.RopeConfig(theta=10_000.0))   # sliding layers'
    # `rope` (TextConfig's) is the global layers'

    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == "sliding_attention"


@dataclass
class Gemma3Config:
    architecture: str
    text: Gemma3TextConfig
    vision: C.VisionConfig                               # SigLIP (its post_layernorm included)
    mm_tokens_per_image: int
    image_token_id: int                                  # <image_soft_token>: the image rows
    boi_token_id: int                                    # <start_of_image>: what the chat template writes
    eoi_token_id: int

    @property
    def pool_kernel(self) -> int:
        """The average pool's kernel: patches per side / tokens per side."""
        return (self.vision.image_size // self.vision.patch_size) // math.isqrt(self.mm_tokens_per_image)


def _rope(params: dict | None, key: str, theta: float) -> C.RopeConfig:
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ROPE_KINDS:
        raise ConfigError(f"text_config.rope_parameters.{key}.rope_type {kind!r} is not supported for Gemma 3 "
                          f"(supported: {', '.join(ROPE_KINDS)})")
    factor = float(params.get("factor", 1.0) or 1.0)
    if factor <= 0:
        raise ConfigError(f"text_config.rope_parameters.{key}.factor must be positive, got {factor}")
    return C.RopeConfig(theta=float(params.get("rope_theta", theta)), kind=kind, factor=factor)


def _layer_types(text: dict, n_layers: int) -> tuple[str, ...]:
    types = text.get("layer_types")
    if types is None:       # the old form, still on the hub: every pattern-th layer is global
        pattern = text.get("sliding_window_pattern", text.get("_sliding_window_pattern",
                                                              GEMMA_DEFAULTS["sliding_window_pattern"]))
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
            raise ConfigError(f"text_config.sliding_window_pattern must be a positive integer, got {pattern!r}")
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers))
    if not isinstance(types, list) or len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"text_config.layer_types must list {n_layers} entries (num_hidden_layers), each one of "
                          f"{', '.join(LAYER_TYPES)}; got {types!r}")
    return tuple(types)


def config(raw: dict) -> Gemma3Config:
    if raw.get("model_type") != NAME:
        raise ConfigError(f"the Gemma 3 family reads model_type gemma3, not {raw.get('model_type')!r}")
    text = raw.get("text_config") or {}
    vision = raw.get("vision_config") or {}
    for key, value in (("text_config", text), ("vision_config", vision)):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a JSON object")
    activation = text.get("hidden_activation") or text.get("hidden_act") or GEMMA_DEFAULTS["hidden_activation"]
    if activation != "gelu_pytorch_tanh":
        raise ConfigError(f"text_config.hidden_activation {activation!r} is not supported for Gemma 3 "
                          f"(only gelu_pytorch_tanh)")
    if text.get("attention_bias"):
        raise ConfigError("text_config.attention_bias=true is not supported for Gemma 3 (no checkpoint has one)")
    if text.get("use_bidirectional_attention"):
        raise ConfigError("text_config.use_bidirectional_attention=true (bidirectional text attention, an "
                          "embedding model) is not supported: foveal runs Gemma 3 as a causal decoder")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if text.get(key) is not None:
            log.warning("text_config.%s=%s is not applied: transformers 5.25's Gemma3ForConditionalGeneration "
                        "does not apply it either, and foveal runs the model as transformers does", key, text[key])
    plain = {k: v for k, v in text.items()
             if k not in ("rope_scaling", "rope_parameters", "rope_theta", "hidden_activation", "hidden_act")}
    cfg_text = C.text_config_from_hf(plain | {"model_type": "gemma3_text", "hidden_act": "silu"},
                                     defaults=TEXT_DEFAULTS)
    cfg_text.hidden_act = "gelu_pytorch_tanh"
    cfg_text.head_dim = text.get("head_dim") or 256        # Gemma3TextConfig's default, not hidden / heads
    if "tie_word_embeddings" in raw or "tie_word_embeddings" in text:
        cfg_text.tie_word_embeddings = bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings")))
    window = text.get("sliding_window", TEXT_DEFAULTS["sliding_window"])
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"text_config.sliding_window must be a positive integer, got {window!r}")
    params = text.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        global_params, local_params = params.get("full_attention"), params.get("sliding_attention")
    else:   # transformers 4.x: rope_theta + rope_scaling (the global layers'), rope_local_base_freq
        global_params = dict(text.get("rope_scaling") or {}) | {
            "rope_theta": text.get("rope_theta", GEMMA_DEFAULTS["rope_global_theta"])}
        local_params = {"rope_type": "default",
                        "rope_theta": text.get("rope_local_base_freq", GEMMA_DEFAULTS["rope_local_theta"])}
    scalar = text.get("query_pre_attn_scalar", GEMMA_DEFAULTS["query_pre_attn_scalar"])
    if not isinstance(scalar, (int, float)) or isinstance(scalar, bool) or scalar <= 0:
        raise ConfigError(f"text_config.query_pre_attn_scalar must be a positive number, got {scalar!r}")
    t = Gemma3TextConfig(**{f: getattr(cfg_text, f) for f in C.TextConfig.__dataclass_fields__},
                         query_pre_attn_scalar=scalar,
                         layer_types=_layer_types(text, cfg_text.num_hidden_layers),
                         local_rope=_rope(local_params, "sliding_attention", GEMMA_DEFAULTS["rope_local_theta"]))
    t.rope = _rope(global_params, "full_attention", GEMMA_DEFAULTS["rope_global_theta"])
    t.sliding_window = window
    t.model_type = "gemma3_text"

    vcfg = C.vision_config_from_hf(vision | {"model_type": vision.get("model_type", "siglip_vision_model")})
    if not vcfg.is_siglip:
        raise ConfigError(f"vision_config.model_type {vcfg.model_type!r}: Gemma 3's tower is SigLIP "
                          f"(siglip_vision_model)")
    tokens = {k: raw.get(k, v) for k, v in TOKEN_DEFAULTS.items()}
    for key in ("boi_token_index", "eoi_token_index", "image_token_index"):
        value = tokens[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < t.vocab_size:
            raise ConfigError(f"{key} {value!r} is not a token id of the {t.vocab_size}-token vocabulary")
    n = tokens["mm_tokens_per_image"]
    side, patches = (math.isqrt(n) if isinstance(n, int) and n > 0 else 0), vcfg.image_size // vcfg.patch_size
    if not side or side * side != n or patches % side:
        raise ConfigError(f"mm_tokens_per_image {n!r} must be a square whose side divides the tower's "
                          f"{patches} patches per side (image_size {vcfg.image_size} / patch_size {vcfg.patch_size})")
    return Gemma3Config((raw.get("architectures") or [ARCHITECTURE])[0], t, vcfg, n, tokens["image_token_index"],
                        tokens["boi_token_index"], tokens["eoi_token_index"])
