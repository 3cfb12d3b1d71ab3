"""Pixtral and Mistral 3 configs: config.json -> dataclasses, with transformers 5.25's class defaults.

Two HF shapes share the Pixtral ViT and a Mistral decoder:
- `llava` with `vision_config.model_type == "pixtral"` (Pixtral-12B): LlavaConfig's defaults, the
  vision tower's hidden states straight into a Linear-GELU-Linear projector, one token per patch.
- `mistral3` (Mistral Small 3.1 / 3.2): Mistral3Config's defaults (its own sub-config defaults when
  vision_config / text_config are absent), an RMS norm and a `spatial_merge_size`^2 patch merger before
  the projector, one token per merged block; the head is tied unless the top-level flag says otherwise
  (Mistral3Config's default is True, and transformers 5 ties by the top-level flag).
"""

from __future__ import annotations

from dataclasses import dataclass

from .... import config as C
from ....errors import ConfigError, UnsupportedModelError

# transformers 5.25 PixtralVisionConfig class defaults
VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       num_channels=3, image_size=1024, patch_size=16, hidden_act="gelu", rope_theta=10000.0)
# Mistral3Config's sub-config defaults (used only where config.json has no vision_config / text_config)
MISTRAL3_VISION = dict(VISION_DEFAULTS, intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=1540,
                       num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu")
MISTRAL3_TEXT = dict(model_type="mistral", head_dim=128, hidden_act="silu", hidden_size=5120,
                     intermediate_size=32768, max_position_embeddings=131072, num_attention_heads=32,
                     num_hidden_layers=40, num_key_value_heads=8, rms_norm_eps=1e-05, rope_theta=1000000000.0,
                     sliding_window=None, vocab_size=131072)
LLAVA_DEFAULTS = dict(image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default", multimodal_projector_bias=True)
MISTRAL3_DEFAULTS = dict(image_token_index=10, projector_hidden_act="gelu", vision_feature_layer=-1,
                         multimodal_projector_bias=False, spatial_merge_size=2)
ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "mistral3": "Mistral3ForConditionalGeneration"}
TEXT_TYPES = ("mistral", "llama")
ACTIVATIONS = ("gelu", "silu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu")


@dataclass
class PixtralVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    rope_theta: float

    @property
    def head_dim(self) -> int:       # PixtralVisionConfig sets it so, whatever config.json says
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict, defaults: dict) -> "PixtralVisionConfig":
        get = lambda k: d.get(k, defaults[k])  # noqa: E731
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError("vision_config.rope_parameters must be a JSON object")
        if rope.get("rope_type", "axial") != "axial":
            raise UnsupportedModelError(f"vision_config.rope_parameters.rope_type {rope['rope_type']!r}: the Pixtral "
                                        f"ViT takes only axial (2-D) RoPE")
        cfg = cls(**{k: get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_channels", "image_size", "patch_size",
                                          "hidden_act")},
                  rope_theta=float(rope.get("rope_theta", d.get("rope_theta", defaults["rope_theta"]))))
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size"):
            value = getattr(cfg, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"vision_config.{key} must be a positive integer, got {value!r}")
        if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 4:
            raise ConfigError(f"vision_config.hidden_size {cfg.hidden_size} over num_attention_heads "
                              f"{cfg.num_attention_heads} must give a head size divisible by 4 (2-D RoPE)")
        if cfg.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(f"vision_config.hidden_act {cfg.hidden_act!r} is not supported; "
                                        f"supported: {', '.join(ACTIVATIONS)}")
        return cfg


@dataclass
class PixtralConfig:
    kind: str                        # llava (Pixtral-12B) | mistral3
    architecture: str
    text: C.TextConfig
    vision: PixtralVisionConfig
    image_token_id: int
    feature_layers: tuple[int, ...]  # hidden states of the tower fed to the projector (concatenated)
    projector_act: str
    projector_bias: bool
    spatial_merge_size: int          # 1 on Pixtral-12B
    projector_norm_eps: float        # Mistral 3's RMS norm before the merger (the text model's eps)

    @property
    def tokens_patch(self) -> int:
        """Pixels one image token covers along each side."""
        return self.vision.patch_size * self.spatial_merge_size


def _int(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


def config(raw: dict) -> PixtralConfig:
    kind = raw.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConfigError(f"the Pixtral family reads model_type llava (with a pixtral vision_config) or mistral3, "
                          f"not {kind!r}")
    vision_raw, text_raw = raw.get("vision_config"), raw.get("text_config")
    for key, value in (("vision_config", vision_raw), ("text_config", text_raw)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{key} must be a JSON object")
    if kind == "llava":
        if not vision_raw or vision_raw.get("model_type") != "pixtral":
            raise ConfigError("a llava config reaches the Pixtral family only with vision_config.model_type pixtral")
        vision = PixtralVisionConfig.from_hf(vision_raw, VISION_DEFAULTS)
        text_raw = text_raw or {"model_type": "llama"}
        defaults = LLAVA_DEFAULTS
    else:
        vision = PixtralVisionConfig.from_hf(vision_raw, VISION_DEFAULTS) if vision_raw else \
            PixtralVisionConfig.from_hf({}, MISTRAL3_VISION)
        text_raw = text_raw or dict(MISTRAL3_TEXT)
        defaults = MISTRAL3_DEFAULTS
    text_type = text_raw.get("model_type", "mistral" if kind == "mistral3" else "llama")
    if text_type not in TEXT_TYPES:
        raise UnsupportedModelError(f"text_config.model_type {text_type!r} is not supported for {kind}; "
                                    f"supported: {', '.join(TEXT_TYPES)}")
    text = C.text_config_from_hf(text_raw | {"model_type": text_type})
    if kind == "llava":      # LlavaConfig takes text_config's flag too (older saves)
        text.tie_word_embeddings = bool(raw.get("tie_word_embeddings")) or text.tie_word_embeddings
    else:
        text.tie_word_embeddings = bool(raw.get("tie_word_embeddings", True))
    get = lambda k: raw.get(k, defaults[k])  # noqa: E731
    layer = get("vision_feature_layer")
    layers = tuple(layer) if isinstance(layer, (list, tuple)) else (layer,)
    n_states = vision.num_hidden_layers + 1
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not -n_states <= i < n_states:
            raise ConfigError(f"vision_feature_layer {layer!r}: the tower has {n_states} hidden states "
                              f"(use -{n_states}..{n_states - 1})")
    if kind == "llava" and get("vision_feature_select_strategy") != "full":
        raise ConfigError(f"vision_feature_select_strategy {get('vision_feature_select_strategy')!r} drops the first "
                          f"patch of a Pixtral tower's output, which then no longer splits into its images; "
                          f"Pixtral checkpoints use 'full'")
    if kind == "mistral3" and len(layers) > 1:
        raise ConfigError(f"vision_feature_layer {layer!r}: Mistral 3's projector norm and patch merger take one "
                          f"layer's features (an integer)")
    merge = 1 if kind == "llava" else _int(get("spatial_merge_size"), "spatial_merge_size")
    if merge < 1:
        raise ConfigError(f"spatial_merge_size must be >= 1, got {merge}")
    act = get("projector_hidden_act")
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(f"projector_hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    token = _int(raw.get("image_token_index", raw.get("image_token_id", defaults["image_token_index"])),
                 "image_token_index")
    if not 0 <= token < text.vocab_size:
        raise ConfigError(f"image_token_index {token} is not a token id of the {text.vocab_size}-token vocabulary")
    return PixtralConfig(kind, (raw.get("architectures") or [ARCHITECTURES[kind]])[0], text, vision, token,
                         layers, act, bool(get("multimodal_projector_bias")), merge, text.rms_norm_eps)
