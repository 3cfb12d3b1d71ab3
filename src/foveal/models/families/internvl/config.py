"""InternVL's config.json (transformers' `InternVLConfig` / `InternVLVisionConfig`) as flat dataclasses.

Design decisions:
- Absent keys take transformers 5.25's class defaults (`InternVLVisionConfig`: a 24-layer 1024-wide
  InternViT-300M at 448 px; `InternVLConfig`: downsample_ratio 0.5, 256 tokens a tile, a tied head);
  an absent `text_config` is HF's default Qwen2.
- The head is tied by the top-level `tie_word_embeddings` (what transformers 5 reads for this
  model), True by default.
- Only what transformers runs is accepted: a square tile (the position table is used as is; HF
  interpolates it only for other sizes, which its processor never makes), one `vision_feature_layer`
  (a list fails inside HF), the `default` select strategy (HF's `full` keeps CLS and then cannot
  reshape the patches into a square), and a downsample ratio whose inverse and pixel-shuffled grid
  are whole numbers. Anything else is a ConfigError naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from .... import config as C
from ....errors import ConfigError
from ...vision import ACTIVATIONS

NORM_TYPES = ("layer_norm", "rms_norm")
# transformers 5.25 InternVLVisionConfig class defaults
VISION_DEFAULTS = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, attention_bias=False,
                       use_qk_norm=False, intermediate_size=4096, hidden_act="gelu", norm_type="layer_norm",
                       layer_norm_eps=1e-6, image_size=448, patch_size=14, num_channels=3, use_mask_token=False,
                       use_absolute_position_embeddings=True, use_mean_pooling=True)
# transformers 5.25 InternVLConfig class defaults
DEFAULTS = dict(image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
                vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True)


@dataclass(frozen=True)
class InternViTConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    attention_bias: bool           # on q / k / v (the output projection always has one)
    use_qk_norm: bool              # RMSNorm over the whole q / k width, before the heads split
    norm_type: str                 # layer_norm | rms_norm, both norms of every layer
    layer_norm_eps: float
    image_size: int                # a tile's side in pixels
    patch_size: int
    num_channels: int
    use_mask_token: bool           # a (training-only) mask_token parameter in the checkpoint
    use_absolute_position_embeddings: bool
    use_mean_pooling: bool         # False: a final LayerNorm on the last layer's output

    @property
    def grid(self) -> int:
        """Patches along a tile's side."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: dict) -> InternViTConfig:
        if not isinstance(d, dict):
            raise ConfigError("vision_config must be a JSON object")
        v = VISION_DEFAULTS | {k: x for k, x in d.items() if x is not None and k in VISION_DEFAULTS}
        fields = dict(v)
        for key in ("image_size", "patch_size"):
            fields[key] = _square(v[key], f"vision_config.{key}")
        return cls(**fields)

    def __post_init__(self):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                    "patch_size", "num_channels"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"vision_config.{key} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config.hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config.image_size {self.image_size} is not a multiple of patch_size "
                              f"{self.patch_size}")
        if self.norm_type not in NORM_TYPES:
            raise ConfigError(f"vision_config.norm_type {self.norm_type!r} is not one of {', '.join(NORM_TYPES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(ACTIVATIONS)})")


@dataclass
class InternVLConfig:
    architecture: str
    text: C.TextConfig
    vision: InternViTConfig
    image_token_id: int            # <IMG_CONTEXT>
    image_seq_length: int          # tokens a tile takes
    downsample_ratio: float
    projector_hidden_act: str
    vision_feature_layer: int      # -1: the tower's output (after its final norm); else hidden_states[k]

    @property
    def shuffle(self) -> int:
        """Patches merged along each side by the pixel shuffle (1 / downsample_ratio)."""
        return int(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        side = int(self.vision.grid * self.downsample_ratio)
        return side * side

    @property
    def layers_run(self) -> int:
        """Encoder layers the selected features need."""
        k = self.vision_feature_layer
        return self.vision.num_hidden_layers if k == -1 else k % (self.vision.num_hidden_layers + 1)


def config(raw: dict) -> InternVLConfig:
    if not isinstance(raw, dict):
        raise ConfigError("config.json must hold a JSON object")
    if raw.get("model_type") != "internvl":
        raise ConfigError(f"the InternVL family reads model_type internvl, not {raw.get('model_type')!r}")
    text = raw.get("text_config") or {"model_type": "qwen2"}
    if not isinstance(text, dict):
        raise ConfigError("text_config must be a JSON object")
    text = {"model_type": "qwen2"} | text
    cfg_text = C.text_config_from_hf(text)
    if text["model_type"] == "qwen2":
        cfg_text.attention_bias = True        # Qwen2's q/k/v always carry a bias
        cfg_text.sliding_window = text.get("sliding_window") if text.get("use_sliding_window") else None
    get = lambda key: raw[key] if raw.get(key) is not None else DEFAULTS[key]  # noqa: E731
    cfg_text.tie_word_embeddings = bool(get("tie_word_embeddings"))
    vision = InternViTConfig.from_hf(raw.get("vision_config") or {})
    cfg = InternVLConfig((raw.get("architectures") or ["InternVLForConditionalGeneration"])[0], cfg_text, vision,
                         get("image_token_id"), get("image_seq_length"), get("downsample_ratio"),
                         get("projector_hidden_act"), get("vision_feature_layer"))
    _check(cfg, get("vision_feature_select_strategy"))
    return cfg


def _check(cfg: InternVLConfig, strategy) -> None:
    v = cfg.vision
    token = cfg.image_token_id
    if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < cfg.text.vocab_size:
        raise ConfigError(f"image_token_id {token!r} is not a token id of the {cfg.text.vocab_size}-token vocabulary")
    if strategy != "default":
        raise ConfigError(f"vision_feature_select_strategy {strategy!r} is not supported: InternVL drops the CLS "
                          f"token ('default'); with it kept the patches do not form a square grid")
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool) or not -(v.num_hidden_layers + 1) <= layer <= v.num_hidden_layers:
        raise ConfigError(f"vision_feature_layer {layer!r} must be one layer index in "
                          f"-{v.num_hidden_layers + 1}..{v.num_hidden_layers} (a list is not supported)")
    ratio = cfg.downsample_ratio
    if (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1
            or 1 / ratio != int(1 / ratio) or v.grid * ratio != int(v.grid * ratio)):
        raise ConfigError(f"downsample_ratio {ratio!r} must be 1 / n for a whole n that divides the tile's "
                          f"{v.grid}x{v.grid} patch grid (0.5 in every InternVL)")
    if cfg.projector_hidden_act not in ACTIVATIONS:
        raise ConfigError(f"projector_hidden_act {cfg.projector_hidden_act!r} is not supported "
                          f"(supported: {', '.join(ACTIVATIONS)})")
    if cfg.image_seq_length != cfg.tokens_per_tile:
        raise ConfigError(f"image_seq_length {cfg.image_seq_length} differs from the tokens a tile makes: "
                          f"({v.image_size} // {v.patch_size} * downsample_ratio {ratio}) ** 2 = {cfg.tokens_per_tile}")


def _square(value, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{key} {list(value)} is not square: InternVL's tiles and patches are square")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value
