"""Model configuration: one flat dataclass per part, built from HF `config.json`.

Design decisions:
- HF config files are sparse. Absent keys take the *HF class defaults* (the tables below,
  checked against transformers' config classes in tests/test_config.py), never our own.
- Three config shapes are accepted: llava-hf (`model_type: llava`, nested `vision_config` /
  `text_config`), a plain text LM (`llama` / `mistral` / `qwen2`), and the original LLaVA repo
  (`llava_llama` / `llava_qwen` / `llava_mistral`: a flat LM config plus `mm_*` keys, the vision
  tower named by `mm_vision_tower` and stored in a separate CLIP checkpoint).
- RoPE parameters may come as `rope_theta` + `rope_scaling` (transformers 4.x) or as
  `rope_parameters` (transformers 5); both become one `RopeConfig`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError, UnsupportedModelError
from .processing.anyres import LLAVA_NEXT_PINPOINTS, check_pinpoints, layout

VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
TEXT_TYPES = ("llama", "mistral", "qwen2")
PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# HF class defaults (transformers' CLIPVisionConfig, SiglipVisionConfig, LlamaConfig, ...).
VISION_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
# LlavaConfig() fills an absent vision_config with CLIP ViT-L/14-336.
LLAVA_VISION_DEFAULT = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)
TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=10000.0, attention_bias=False, mlp_bias=False, bos_token_id=1,
                  eos_token_id=2),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    rope_theta=10000.0, attention_bias=False, mlp_bias=False, bos_token_id=1,
                    eos_token_id=2, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=10000.0, attention_bias=True, mlp_bias=False, bos_token_id=None,
                  eos_token_id=None),
}
LLAVA_DEFAULTS = dict(image_token_index=32000, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-2,
                      multimodal_projector_bias=True)


@dataclass
class VisionConfig:
    model_type: str = "clip_vision_model"      # clip_vision_model | siglip_vision_model
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def is_siglip(self) -> bool:
        return self.model_type == "siglip_vision_model"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ProjectorConfig:
    kind: str = "mlp2x_gelu"                  # linear | mlp2x_gelu
    in_features: int = 1024                    # vision hidden * number of feature layers
    out_features: int = 4096                   # LM hidden size
    hidden_act: str = "gelu"
    bias: bool = True


@dataclass
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"                      # default | linear | dynamic | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0               # llama3
    high_freq_factor: float = 4.0              # llama3
    original_max_position_embeddings: int | None = None   # llama3 (and dynamic's reference length)


@dataclass
class TextConfig:
    model_type: str = "llama"                  # llama | mistral | qwen2
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False               # bias on q/k/v (Qwen2: True); never on o_proj
    mlp_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    sliding_window: int | None = None          # Mistral v0.1; attention beyond it is not windowed here
    mrope_section: tuple[int, ...] | None = None   # multimodal RoPE (Qwen2-VL): frequencies per position row
    mrope_interleaved: bool = False            # M-RoPE rows interleaved over the frequencies (Qwen3-VL), not in sections
    qk_norm: bool = False                      # RMSNorm over each q / k head before RoPE (Qwen3)


@dataclass
class VLMConfig:
    text: TextConfig
    vision: VisionConfig | None = None         # None: a text-only model
    projector: ProjectorConfig | None = None
    image_token_id: int | None = None          # id in the vocabulary; None for the original LLaVA layout
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"   # default (drop CLS) | full
    layout: str = "llava-hf"                   # llava-hf | original | text
    vision_tower_path: str | None = None       # original layout: where the CLIP tower lives
    architecture: str = "LlavaForConditionalGeneration"
    image_grid_pinpoints: tuple | None = None  # LLaVA-NeXT anyres tiling ((H, W), ...); None: one view

    @property
    def anyres(self) -> bool:
        return self.image_grid_pinpoints is not None and self.vision is not None

    def image_layout(self, size: tuple[int, int]):
        """An anyres model's token layout for an image of (height, width) `size`."""
        return layout(size, self.image_grid_pinpoints, self.vision.image_size, self.vision.patch_size,
                      self.image_tokens_per_image)

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Image tokens for an image of (height, width) `size`: fixed, except on anyres models."""
        return self.image_layout(size).tokens if self.anyres else self.image_tokens_per_image

    @property
    def max_image_tokens(self) -> int:
        """The most tokens one image can take (anyres: at the largest pinpoint, a full-frame image)."""
        if not self.anyres:
            return self.image_tokens_per_image
        return max(self.image_tokens(p) for p in self.image_grid_pinpoints)

    @property
    def image_tokens_per_image(self) -> int:
        if self.vision is None:
            return 0
        n = self.vision.num_patches + (0 if self.vision.is_siglip else 1)   # CLIP has a CLS row
        # HF drops position 0 under "default" whatever the tower (on SigLIP that is a patch).
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    @property
    def feature_layers(self) -> list[int]:
        v = self.vision_feature_layer
        return list(v) if isinstance(v, (list, tuple)) else [v]

    def to_dict(self) -> dict:
        return asdict(self)


def _pick(d: dict, defaults: dict, key: str):
    value = d.get(key)
    return defaults.get(key) if value is None else value


def vision_config_from_hf(d: dict) -> VisionConfig:
    model_type = d.get("model_type", "clip_vision_model")
    if model_type in ("clip", "siglip"):      # a full CLIP/SigLIP config: take its vision half
        d = d.get("vision_config", {}) | {"model_type": f"{model_type}_vision_model"}
        model_type = d["model_type"]
    if model_type not in VISION_DEFAULTS:
        raise UnsupportedModelError(
            f"vision tower model_type {model_type!r} is not supported; supported: {', '.join(VISION_TYPES)}")
    defaults = VISION_DEFAULTS[model_type]
    cfg = VisionConfig(model_type=model_type, **{k: _pick(d, defaults, k) for k in defaults})
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"vision hidden_size {cfg.hidden_size} is not divisible by "
                          f"num_attention_heads {cfg.num_attention_heads}")
    # not necessarily a multiple: SigLIP-so400m is 384 px in 14 px patches (27 x 27, the conv floors)
    if cfg.image_size < cfg.patch_size:
        raise ConfigError(f"vision image_size {cfg.image_size} is smaller than patch_size {cfg.patch_size}")
    return cfg


def rope_config_from_hf(d: dict) -> RopeConfig:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        # v5 form; like transformers, a theta missing from it comes from the top-level rope_theta
        theta, scaling = params.get("rope_theta", d.get("rope_theta", 10000.0)), params
    else:
        theta, scaling = d.get("rope_theta", 10000.0), d.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    factor = float(scaling.get("factor", 1.0) or 1.0)
    if kind != "default" and factor <= 0:
        raise ConfigError(f"RoPE scaling factor must be positive, got {factor}")
    if kind == "llama3" and "original_max_position_embeddings" not in scaling:
        raise ConfigError("llama3 RoPE scaling needs original_max_position_embeddings")
    return RopeConfig(theta=float(theta), kind=kind, factor=factor,
                      low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                      high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                      original_max_position_embeddings=scaling.get("original_max_position_embeddings"))


def text_config_from_hf(d: dict, defaults: dict | None = None) -> TextConfig:
    """defaults: a family's own class defaults for its decoder (e.g. Qwen2VLTextConfig's); by default the
    table above, by model_type."""
    model_type = d.get("model_type", "llama")
    if defaults is None and model_type not in TEXT_DEFAULTS:
        raise UnsupportedModelError(
            f"language model model_type {model_type!r} is not supported; supported: {', '.join(TEXT_TYPES)}")
    defaults = TEXT_DEFAULTS[model_type] if defaults is None else defaults
    get = lambda k: _pick(d, defaults, k)  # noqa: E731
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    hidden = get("hidden_size")
    head_dim = d.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    eos = d["eos_token_id"] if "eos_token_id" in d else defaults["eos_token_id"]
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if get("hidden_act") != "silu":
        raise UnsupportedModelError(f"language model hidden_act {get('hidden_act')!r} is not supported (only silu)")
    return TextConfig(
        model_type=model_type, vocab_size=get("vocab_size"), hidden_size=hidden,
        intermediate_size=get("intermediate_size"), num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        hidden_act="silu", max_position_embeddings=get("max_position_embeddings"),
        rms_norm_eps=get("rms_norm_eps"), tie_word_embeddings=bool(get("tie_word_embeddings")),
        attention_bias=bool(get("attention_bias")), mlp_bias=bool(get("mlp_bias")),
        rope=rope_config_from_hf(d), eos_token_id=eos,
        # an explicit null means "none" (HF keeps it), not "the class default"
        bos_token_id=d["bos_token_id"] if "bos_token_id" in d else defaults["bos_token_id"],
        pad_token_id=d.get("pad_token_id"),
        sliding_window=d.get("sliding_window", defaults.get("sliding_window")),
    )


def _projector_kind(hidden_act: str | None, mm_projector_type: str | None) -> tuple[str, str]:
    if mm_projector_type is not None:          # original LLaVA names: linear | mlp2x_gelu
        if mm_projector_type not in PROJECTOR_TYPES:
            raise UnsupportedModelError(f"projector type {mm_projector_type!r} is not supported; "
                                        f"supported: {', '.join(PROJECTOR_TYPES)}")
        return mm_projector_type, "gelu"
    return "mlp2x_gelu", hidden_act or "gelu"


def config_from_hf(d: dict) -> VLMConfig:
    """Build a VLMConfig from a parsed HF config.json."""
    if not isinstance(d, dict):
        raise ConfigError("config.json must hold a JSON object")
    model_type = d.get("model_type")
    if model_type in ("llava", "llava_next"):
        text = text_config_from_hf(d.get("text_config") or {"model_type": "llama"})
        vision_dict = d.get("vision_config") or LLAVA_VISION_DEFAULT
        vision = vision_config_from_hf(vision_dict)
        get = lambda k: _pick(d, LLAVA_DEFAULTS, k)  # noqa: E731
        layer = get("vision_feature_layer")
        n_layers = len(layer) if isinstance(layer, (list, tuple)) else 1
        kind, act = _projector_kind(get("projector_hidden_act"), None)
        projector = ProjectorConfig(kind=kind, in_features=vision.hidden_size * n_layers,
                                    out_features=text.hidden_size, hidden_act=act,
                                    bias=bool(get("multimodal_projector_bias")))
        cfg = VLMConfig(text=text, vision=vision, projector=projector,
                        image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
                        vision_feature_layer=layer,
                        vision_feature_select_strategy=get("vision_feature_select_strategy"),
                        layout="llava-hf", architecture="LlavaForConditionalGeneration")
        # transformers 5 ties by the top-level flag; LlavaConfig also takes text_config's (older saves)
        if model_type == "llava":
            text.tie_word_embeddings = bool(d.get("tie_word_embeddings")) or text.tie_word_embeddings
        elif "tie_word_embeddings" in d:
            text.tie_word_embeddings = bool(d["tie_word_embeddings"])
        if model_type == "llava_next":
            cfg.architecture = "LlavaNextForConditionalGeneration"
            cfg.image_grid_pinpoints = _pinpoints(LLAVA_NEXT_PINPOINTS if d.get("image_grid_pinpoints") is None
                                                  else d["image_grid_pinpoints"], vision)
    elif model_type in ("llava_llama", "llava_mistral", "llava_qwen", "llava_qwen2") or "mm_vision_tower" in d:
        base = {"llava_llama": "llama", "llava_mistral": "mistral"}.get(model_type, "qwen2" if "qwen" in str(model_type) else "llama")
        text = text_config_from_hf(d | {"model_type": base})
        tower = d.get("mm_vision_tower") or d.get("vision_tower")
        if not tower:
            raise ConfigError("original-LLaVA config has no mm_vision_tower naming its CLIP tower")
        select = d.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise UnsupportedModelError(f"mm_vision_select_feature {select!r} is not supported (patch, cls_patch)")
        kind, act = _projector_kind(None, d.get("mm_projector_type", "linear"))
        hidden = d.get("mm_hidden_size")
        cfg = VLMConfig(text=text, vision=None,
                        projector=ProjectorConfig(kind=kind, in_features=hidden or 0,
                                                  out_features=text.hidden_size, hidden_act=act, bias=True),
                        image_token_id=None, vision_feature_layer=d.get("mm_vision_select_layer", -2),
                        vision_feature_select_strategy="default" if select == "patch" else "full",
                        layout="original", vision_tower_path=tower,
                        architecture=(d.get("architectures") or ["LlavaLlamaForCausalLM"])[0])
        if str(d.get("image_aspect_ratio", "")).startswith("anyres"):   # LLaVA-1.6
            merge = d.get("mm_patch_merge_type", "flat")
            if merge != "spatial_unpad":
                raise UnsupportedModelError(f"anyres with mm_patch_merge_type {merge!r} is not supported "
                                            f"(spatial_unpad, as LLaVA-1.6 ships)")
            cfg.image_grid_pinpoints = d.get("image_grid_pinpoints", LLAVA_NEXT_PINPOINTS)   # checked in attach_vision
    elif model_type in TEXT_DEFAULTS:
        cfg = VLMConfig(text=text_config_from_hf(d), layout="text",
                        architecture=(d.get("architectures") or [model_type])[0])
    else:       # another family's config, or none foveal knows: the registry names what is supported
        from .models.registry import family_name
        raise UnsupportedModelError(f"config_from_hf reads the LLaVA and text-only families, not "
                                    f"{family_name(d)!r}")
    _check_feature_layers(cfg)
    if cfg.vision is not None:
        _check_anyres(cfg)
    return cfg


def _pinpoints(value, vision: VisionConfig) -> tuple:
    if vision.image_size % vision.patch_size:
        raise UnsupportedModelError(f"anyres tiling needs a tower whose image_size ({vision.image_size}) is a "
                                    f"multiple of its patch_size ({vision.patch_size})")
    return check_pinpoints(value, tile=vision.image_size)


def _check_anyres(cfg: VLMConfig) -> None:
    grid = cfg.vision.image_size // cfg.vision.patch_size
    if cfg.anyres and cfg.image_tokens_per_image != grid * grid:
        raise UnsupportedModelError(
            f"anyres tiling needs each tile's features to form a {grid}x{grid} grid, but this tower and "
            f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} give {cfg.image_tokens_per_image}")


def _check_feature_layers(cfg: VLMConfig) -> None:
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} "
                          f"is not supported (default, full)")
    if cfg.vision is None:
        return
    n = cfg.vision.num_hidden_layers
    for layer in cfg.feature_layers:
        if not -(n + 1) <= layer <= n:
            raise ConfigError(f"vision_feature_layer {layer} is outside the tower's {n + 1} hidden states")


def attach_vision(cfg: VLMConfig, vision_dict: dict) -> None:
    """Original LLaVA layout: fill in the vision tower's config from its own config.json."""
    cfg.vision = vision_config_from_hf(vision_dict)
    if cfg.image_grid_pinpoints is not None:
        cfg.image_grid_pinpoints = _pinpoints(cfg.image_grid_pinpoints, cfg.vision)
    if cfg.projector.in_features == 0:
        cfg.projector.in_features = cfg.vision.hidden_size * len(cfg.feature_layers)
    _check_feature_layers(cfg)
    _check_anyres(cfg)


def load_config_file(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config.json in {Path(path).parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
