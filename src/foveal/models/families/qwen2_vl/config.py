"""Qwen-VL vision-tower config and the text side's M-RoPE section, read from HF config dicts.

Design decisions
- One flat dataclass for the three towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); `kind` says which,
  and the fields a kind does not use keep their HF default (harmless, never read).
- HF's key names differ between generations for the same thing: Qwen2-VL calls the ViT width
  `embed_dim` and the output (LM) width `hidden_size`; Qwen2.5-VL / Qwen3-VL call the ViT width
  `hidden_size` and the output width `out_hidden_size`. Here they are `width` and `out_width`.
- Absent keys take the defaults of transformers 5.25's `Qwen2VLVisionConfig`,
  `Qwen2_5_VLVisionConfig` and `Qwen3VLVisionConfig` (the class attributes, not a checkpoint's).
- Every value is checked; a nonsense one is a ConfigError naming the key and what would do.
"""

from __future__ import annotations

from dataclasses import dataclass

from foveal.errors import ConfigError

KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_ACTIVATIONS = ("quick_gelu", "silu", "gelu", "gelu_pytorch_tanh")

# transformers 5.25 class defaults, per kind, in this module's field names.
_DEFAULTS = {
    "qwen2_vl": dict(depth=32, width=1280, out_width=3584, num_heads=16, intermediate_size=1280 * 4,
                     hidden_act="quick_gelu", patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                     in_channels=3, rope_theta=10000.0),
    "qwen2_5_vl": dict(depth=32, width=3584, out_width=3584, num_heads=16, intermediate_size=3420,
                       hidden_act="silu", patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                       in_channels=3, rope_theta=10000.0, window_size=112,
                       fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=4),
    "qwen3_vl": dict(depth=27, width=1152, out_width=3584, num_heads=16, intermediate_size=4304,
                     hidden_act="gelu_pytorch_tanh", patch_size=16, temporal_patch_size=2,
                     spatial_merge_size=2, in_channels=3, rope_theta=10000.0,
                     num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24)),
}
# HF's default mrope_section when rope_parameters has none (the rotary classes' fallback).
_DEFAULT_MROPE = {"qwen2_vl": (16, 24, 24), "qwen2_5_vl": (16, 24, 24), "qwen3_vl": (24, 20, 20)}


@dataclass(frozen=True)
class QwenVisionConfig:
    kind: str                      # "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    depth: int                     # transformer blocks
    width: int                     # ViT hidden size (HF: embed_dim in 2-VL, hidden_size in 2.5/3)
    out_width: int                 # merger output = LM hidden size (HF: hidden_size in 2-VL, out_hidden_size)
    num_heads: int
    intermediate_size: int         # MLP hidden size (2-VL: embed_dim * mlp_ratio)
    hidden_act: str
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    rope_theta: float = 10000.0    # the 2-D vision RoPE base
    window_size: int = 112         # 2.5-VL: window side in pixels
    fullatt_block_indexes: tuple[int, ...] = ()  # 2.5-VL: blocks with full (not window) attention
    tokens_per_second: int = 4     # 2.5-VL: video time positions per second
    num_position_embeddings: int = 2304          # 3-VL: learned position table (a square grid)
    deepstack_visual_indexes: tuple[int, ...] = ()  # 3-VL: blocks whose output feeds an extra merger

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one row of pixel_values: C * Tp * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_merged(self) -> int:
        """2.5-VL window side in merged tokens (HF: window_size // merge // patch)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_hf(cls, vision: dict, kind: str) -> QwenVisionConfig:
        """From the HF `vision_config` dict of a model of `kind` (the top-level model_type)."""
        if kind not in KINDS:
            raise ConfigError(f"unknown Qwen-VL kind {kind!r} (known: {', '.join(KINDS)})")
        if not isinstance(vision, dict):
            raise ConfigError(f"vision_config must be a JSON object, got {type(vision).__name__}")
        v = {k: x for k, x in vision.items() if x is not None}
        d = _DEFAULTS[kind]
        get = lambda key, field: v.get(key, d[field])  # noqa: E731
        rope = v.get("rope_parameters") or {}
        if kind == "qwen2_vl":
            width = get("embed_dim", "width")
            fields = dict(width=width, out_width=get("hidden_size", "out_width"),
                          intermediate_size=_positive_int(v.get("mlp_ratio", 4), "vision_config.mlp_ratio")
                          * _positive_int(width, "vision_config.embed_dim"))
        else:
            fields = dict(width=get("hidden_size", "width"), out_width=get("out_hidden_size", "out_width"),
                          intermediate_size=get("intermediate_size", "intermediate_size"))
        fields.update(
            depth=get("depth", "depth"), num_heads=get("num_heads", "num_heads"),
            hidden_act=get("hidden_act", "hidden_act"), patch_size=get("patch_size", "patch_size"),
            temporal_patch_size=get("temporal_patch_size", "temporal_patch_size"),
            spatial_merge_size=get("spatial_merge_size", "spatial_merge_size"),
            # Old Qwen2-VL checkpoints spell it in_chans; HF 5 reads in_channels only (both are 3 in practice).
            in_channels=v.get("in_channels", v.get("in_chans", d["in_channels"])),
            rope_theta=rope.get("rope_theta", d["rope_theta"]),
        )
        if kind == "qwen2_5_vl":
            fields.update(window_size=get("window_size", "window_size"),
                          fullatt_block_indexes=tuple(get("fullatt_block_indexes", "fullatt_block_indexes")),
                          tokens_per_second=get("tokens_per_second", "tokens_per_second"))
        if kind == "qwen3_vl":
            fields.update(num_position_embeddings=get("num_position_embeddings", "num_position_embeddings"),
                          deepstack_visual_indexes=tuple(get("deepstack_visual_indexes",
                                                             "deepstack_visual_indexes")))
        return cls(kind=kind, **fields)

    def __post_init__(self):
        hf = _HF_KEYS[self.kind]
        for name in ("depth", "width", "out_width", "num_heads", "intermediate_size", "patch_size",
                     "temporal_patch_size", "spatial_merge_size", "in_channels", "window_size",
                     "tokens_per_second", "num_position_embeddings"):
            _positive_int(getattr(self, name), f"vision_config.{hf.get(name, name)}")
        if self.width % self.num_heads:
            raise ConfigError(f"vision_config: {hf['width']}={self.width} is not divisible by "
                              f"num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"vision_config: the head size {hf['width']}/num_heads = {self.head_dim} must be "
                              f"a multiple of 4 (the 2-D rotary embedding splits it into h and w halves)")
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(_ACTIVATIONS)})")
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            raise ConfigError(f"vision_config.rope_parameters.rope_theta must be a positive number, "
                              f"got {self.rope_theta!r}")
        for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            for i in getattr(self, name):
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.depth:
                    raise ConfigError(f"vision_config.{name} holds {i!r}, not a block index in "
                                      f"0..{self.depth - 1} (depth={self.depth})")
        if self.kind == "qwen2_5_vl" and self.window_merged < 1:
            raise ConfigError(f"vision_config.window_size={self.window_size} is smaller than one merged "
                              f"token (patch_size * spatial_merge_size = "
                              f"{self.patch_size * self.spatial_merge_size} pixels)")
        if self.kind == "qwen3_vl" and round(self.num_position_embeddings ** 0.5) ** 2 != self.num_position_embeddings:
            raise ConfigError(f"vision_config.num_position_embeddings={self.num_position_embeddings} is not a "
                              f"square number (the learned table is a square grid)")


_HF_KEYS = {
    "qwen2_vl": {"width": "embed_dim", "out_width": "hidden_size", "intermediate_size": "mlp_ratio"},
    "qwen2_5_vl": {"width": "hidden_size", "out_width": "out_hidden_size"},
    "qwen3_vl": {"width": "hidden_size", "out_width": "out_hidden_size"},
}


def _positive_int(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def mrope_section(text_config: dict, head_dim: int, kind: str = "qwen2_vl") -> tuple[int, int, int]:
    """The text side's M-RoPE `mrope_section` (t, h, w frequency counts), checked against head_dim.

    Read from `rope_parameters` (transformers 5) or `rope_scaling` (older checkpoints); `text_config`
    may be the text sub-dict or a flat top-level config. Absent: HF's default for `kind`.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown Qwen-VL kind {kind!r} (known: {', '.join(KINDS)})")
    rope = text_config.get("rope_parameters") or text_config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_parameters must be a JSON object, got {rope!r}")
    section = rope.get("mrope_section")
    if section is None:
        section = _DEFAULT_MROPE[kind]
    if (not isinstance(section, (list, tuple)) or len(section) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in section)):
        raise ConfigError(f"rope_parameters.mrope_section must be three non-negative integers "
                          f"(temporal, height, width), got {section!r}")
    if sum(section) != head_dim // 2 or head_dim % 2:
        raise ConfigError(f"rope_parameters.mrope_section {list(section)} sums to {sum(section)}, but the "
                          f"head size {head_dim} has {head_dim // 2} rotary frequencies; the three "
                          f"numbers must add up to head_dim / 2 = {head_dim // 2}")
    return tuple(section)
