"""The LLaVA-OneVision family (llava_onevision): LLaVA-NeXT's anyres tiling on a larger grid, with a budget.

A SigLIP tower, LLaVA's 2-layer-MLP projector, a Qwen2 decoder (`models.vlm.VisionLanguageModel`), and
LLaVA-NeXT's tile geometry (`processing.anyres`). Mirrors transformers 5.25's
LlavaOnevisionForConditionalGeneration (models/llava_onevision/modeling_llava_onevision.py),
LlavaOnevisionImageProcessorPil and LlavaOnevisionProcessor (how many `<image>` tokens an image takes).

Design decisions (what differs from LLaVA-NeXT, and only that lives here):
- Tiles: pinpoints up to 6x6 tiles of 384 px (`ONEVISION_PINPOINTS`, LlavaOnevisionConfig's default). A
  tile is resized to the tower's size, not centre-cropped (the processor has a height/width `size`).
  The tower's patch grid need not divide its image size (384 / 14: the conv floors to 27 x 27).
- The feature budget (`vision_aspect_ratio` "anyres_max_N"): once the unpadded grid of tile features
  holds more than (1.1)^2 N tiles' worth, it is downscaled bilinearly (`F.interpolate`, as HF's
  `pack_image_features`) to about N tiles' worth, keeping its aspect; `image_newline` follows each row.
- A prompt with more than one image does not tile (HF's `batch_num_images`): each image is padded to a
  square in the mean colour, resized to one view, and takes its base features + one `image_newline`.
  The same picture therefore has two embeddings; the chunk's `variant` keys the square one apart.
- The token count follows from the size alone (`OnevisionConfig.image_tokens`), so the prompt is built
  before any pixel is encoded; HF's processor computes the same count from its own settings, which
  `processor` checks against config.json (pinpoints, vision_aspect_ratio, tokens per tile).
- Not here: video (its 2x2 pooling of frame features) and training (`trainable` is False: the trainer's
  LLaVA path counts an image's tokens without knowing how many images its prompt has).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ... import config as C
from ...errors import ConfigError, UnsupportedModelError
from ...processing import anyres
from ...processing.images import ImageProcessorConfig, load_image, preprocess, to_rgb
from ...processing.prompt import IMAGE_PLACEHOLDER, PromptBuilder, normalize_messages
from ..interface import Checkpoint, ImageChunk, Prepared
from ..vlm import VisionLanguageModel
from . import llava
from .llava import LlavaProcessor, _check_budget
from .common import config_as_loaded

NAME = "llava_onevision"

# LlavaOnevisionConfig's (and LlavaOnevisionImageProcessor's) default image_grid_pinpoints, in its order
ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
# LlavaOnevisionConfig() fills an absent vision_config with SigLIP-so400m at 384 px (no pooling head)
VISION_DEFAULT = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, patch_size=14,
                      image_size=384, num_hidden_layers=26, num_attention_heads=16)
DEFAULTS = dict(image_token_index=151646, video_token_index=151647, projector_hidden_act="gelu",
                vision_feature_select_strategy="full", vision_feature_layer=-1, multimodal_projector_bias=True,
                vision_aspect_ratio="anyres_max_9")
IMAGE_PROCESSOR_TYPES = ("LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorPil",
                         "LlavaOnevisionImageProcessorFast")
# LlavaOnevisionImageProcessorPil's class attributes
IMAGE_PROCESSOR_DEFAULTS = dict(size={"height": 384, "width": 384}, crop_size=None, do_center_crop=None,
                                do_resize=True, do_rescale=True, do_normalize=True, rescale_factor=1 / 255,
                                image_mean=(0.48145466, 0.4578275, 0.40821073),
                                image_std=(0.26862954, 0.26130258, 0.27577711), resample=3,
                                image_grid_pinpoints=ONEVISION_PINPOINTS)
SQUARE_VARIANT = ":untiled"     # the embedding of an image in a prompt with several (one padded view)


@dataclass(frozen=True)
class OnevisionLayout:
    """Where one (tiled) image's tokens come from: LLaVA-NeXT's layout, then the grid after the budget."""
    tiles: anyres.AnyresLayout
    rows: int                   # the grid of tile features after the downscale (= unpadded when within budget)
    cols: int

    @property
    def tokens(self) -> int:
        return self.tiles.base_tokens + self.rows * (self.cols + 1)      # one image_newline per row


def budget_of(vision_aspect_ratio) -> int:
    """"anyres_max_N" -> N, the most tiles' worth of features an image keeps."""
    found = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if not found or int(found.group(1)) < 1:
        raise ConfigError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not supported; LLaVA-OneVision takes "
                          f"'anyres_max_N' (N >= 1 tiles' worth of features, e.g. 'anyres_max_9')")
    return int(found.group(1))


def downscaled(rows: int, cols: int, grid: int, budget: int) -> tuple[int, int]:
    """The (rows, cols) an unpadded feature grid is interpolated to (HF pack_image_features' arithmetic)."""
    ratio = math.sqrt(rows * cols / (budget * grid ** 2))
    if ratio <= 1.1:
        return rows, cols
    return int(rows // ratio), int(cols // ratio)


@dataclass
class OnevisionConfig(C.VLMConfig):
    vision_aspect_ratio: str = "anyres_max_9"
    feature_budget: int = 9                     # N of anyres_max_N
    video_token_id: int | None = None

    @property
    def grid(self) -> int:
        return self.vision.image_size // self.vision.patch_size

    def image_layout(self, size: tuple[int, int]) -> OnevisionLayout:
        tiles = super().image_layout(size)
        rows, cols = downscaled(*tiles.unpadded, self.grid, self.feature_budget)
        if (rows, cols) != tiles.unpadded and min(rows, cols) < 1:     # (unpadding alone may leave 0 columns)
            raise ConfigError(f"an image of {size[1]}x{size[0]} px would downscale to a {rows}x{cols} feature grid "
                              f"under vision_aspect_ratio {self.vision_aspect_ratio!r} (transformers fails on it "
                              f"too); raise its N")
        return OnevisionLayout(tiles, rows, cols)

    def image_tokens(self, size: tuple[int, int], tiled: bool = True) -> int:
        """Tokens of a (height, width) image: tiled when it is its prompt's only image, else base + newline."""
        return self.image_layout(size).tokens if tiled else self.image_tokens_per_image + 1

    @property
    def max_image_tokens(self) -> int:
        """The most tokens one image can take. Not at a pinpoint's shape: a grid trimmed by unpadding to just
        within the budget keeps more rows (newlines) than a full one that is downscaled, so every grid that
        unpadding can leave is tried (a superset of what occurs: an upper bound)."""
        g, s, most = self.grid, self.vision.image_size, 0
        for h, w in self.image_grid_pinpoints:
            rows, cols = h // s * g, w // s * g
            shapes = ({(rows, cols - 2 * p) for p in range(cols // 2 + 1)}
                      | {(rows - 2 * p, cols) for p in range(rows // 2 + 1)})
            for r, c in shapes:
                if r > 0 and c > 0:
                    r, c = downscaled(r, c, g, self.feature_budget)
                    most = max(most, r * (c + 1))
        return self.image_tokens_per_image + most


def config(raw: dict) -> OnevisionConfig:
    if not isinstance(raw, dict):
        raise ConfigError("config.json must hold a JSON object")
    get = lambda k: DEFAULTS[k] if raw.get(k) is None else raw[k]  # noqa: E731
    text = C.text_config_from_hf(raw.get("text_config") or {"model_type": "qwen2"})
    vision_raw = raw.get("vision_config") or VISION_DEFAULT
    vision = C.vision_config_from_hf({"model_type": "siglip_vision_model"} | vision_raw)
    layer = get("vision_feature_layer")
    n_layers = len(layer) if isinstance(layer, (list, tuple)) else 1
    projector = C.ProjectorConfig(kind="mlp2x_gelu", in_features=vision.hidden_size * n_layers,
                                  out_features=text.hidden_size, hidden_act=get("projector_hidden_act"),
                                  bias=bool(get("multimodal_projector_bias")))
    aspect = get("vision_aspect_ratio")
    pinpoints = ONEVISION_PINPOINTS if raw.get("image_grid_pinpoints") is None else raw["image_grid_pinpoints"]
    cfg = OnevisionConfig(
        text=text, vision=vision, projector=projector,
        image_token_id=raw.get("image_token_index", raw.get("image_token_id", DEFAULTS["image_token_index"])),
        video_token_id=raw.get("video_token_index", raw.get("video_token_id", DEFAULTS["video_token_index"])),
        vision_feature_layer=layer, vision_feature_select_strategy=get("vision_feature_select_strategy"),
        layout="llava-hf", architecture="LlavaOnevisionForConditionalGeneration",
        image_grid_pinpoints=anyres.check_pinpoints(pinpoints, tile=vision.image_size),
        vision_aspect_ratio=aspect, feature_budget=budget_of(aspect))
    # LlavaOnevisionConfig ties by the top-level flag, or by text_config's when that one is unset
    text.tie_word_embeddings = bool(raw.get("tie_word_embeddings")) or text.tie_word_embeddings
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} is not "
                          f"supported (default, full)")
    n = vision.num_hidden_layers
    for i in cfg.feature_layers:
        if not -(n + 1) <= i <= n:
            raise ConfigError(f"vision_feature_layer {i} is outside the tower's {n + 1} hidden states")
    if cfg.image_tokens_per_image != cfg.grid ** 2:
        raise UnsupportedModelError(
            f"LLaVA-OneVision tiling needs each tile's features to form a {cfg.grid}x{cfg.grid} grid, but this "
            f"tower and vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} give "
            f"{cfg.image_tokens_per_image}")
    return cfg


def complete(cfg: OnevisionConfig, ck: Checkpoint, vision_tower=None) -> None:
    if vision_tower is not None:
        raise ConfigError("vision_tower applies to the original LLaVA layout only; a LLaVA-OneVision "
                          "checkpoint holds its tower")


def build(cfg: OnevisionConfig) -> "OnevisionModel":
    return OnevisionModel(cfg)


def hf_name(name: str, cfg: OnevisionConfig) -> str:
    """Module name -> checkpoint name, as transformers 5 saves LlavaOnevisionForConditionalGeneration."""
    if name.startswith("vision_tower."):
        return "model.vision_tower.vision_model." + name[len("vision_tower."):]
    if name.startswith(("language_model.", "multi_modal_projector.")) or name == "image_newline":
        return "model." + name
    return name


def config_to_hf(cfg: OnevisionConfig, raw: dict) -> dict:
    """config.json for a checkpoint foveal writes of this model: the one it was read from (quantizing does
    not reshape the model)."""
    return config_as_loaded(raw, "a LLaVA-OneVision")


def describe(cfg: OnevisionConfig, processor=None) -> dict:
    d = llava.describe(cfg, processor)
    # the fewest an image takes: one of several in a prompt (one view + a newline)
    return d | {"family": NAME, "image_tokens_per_image": cfg.image_tokens_per_image + 1,
                "vision_aspect_ratio": cfg.vision_aspect_ratio}


def plan_complete(cfg: OnevisionConfig, folder: Path | None) -> list[str]:
    return []


def plan_vision(cfg: OnevisionConfig, images: int, dbytes: int, image_processor: dict | None = None,
                processor=None) -> tuple[int, int, list[str]]:
    """(the most tokens one image takes, bytes of activations to encode `images` images, notes)."""
    per_image, activations, _ = llava.plan_vision(cfg, images, dbytes, image_processor, processor)
    notes = [f"anyres (LLaVA-OneVision, {cfg.vision_aspect_ratio}): a prompt's only image takes up to {per_image} "
             f"tokens by its size and aspect ({llava._max_views(cfg)} tower passes at most), each of several "
             f"{cfg.image_tokens_per_image + 1}; planned at the most"] if images else []
    return per_image, activations, notes


# ---- the model -----------------------------------------------------------------------------------------
class OnevisionModel(VisionLanguageModel):
    """LLaVA's model with OneVision's packing: tiles stitched, unpadded, downscaled past the budget."""
    trainable = False

    def encode(self, pixels) -> list[torch.Tensor]:
        """[(views (V, 3, S, S), (height, width), tiled)] (OnevisionProcessor.pixels) -> one (T, D) per image."""
        return [self.encode_image(views.to(self.vision_device), size, tiled) for views, size, tiled in pixels]

    def encode_image(self, views: torch.Tensor, size: tuple[int, int], tiled: bool = True) -> torch.Tensor:
        embeds = self.encode_images(views)                      # (V, P, D)
        if not tiled:       # one padded view of an image among several: its rows and one newline
            return torch.cat([embeds[0], self.image_newline[None].to(embeds.dtype)])
        return self.pack_anyres(embeds, size)

    def pack_anyres(self, embeds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One image's projected views (1 + tiles, P, D) -> its token rows (T, D) (HF pack_image_features)."""
        lay = self.cfg.image_layout(size)
        grid = anyres.stitch(embeds, lay.tiles)                # (rows, cols, D)
        if (lay.rows, lay.cols) != tuple(grid.shape[:2]):
            x = grid.permute(2, 0, 1).contiguous()[None]        # (1, D, rows, cols)
            grid = F.interpolate(x, [lay.rows, lay.cols], mode="bilinear")[0].permute(1, 2, 0)
        return anyres.with_newlines(embeds[0], grid, self.image_newline)


# ---- the processor -------------------------------------------------------------------------------------
def processor(cfg: OnevisionConfig, ck: Checkpoint, image_mode: str | None = None) -> "OnevisionProcessor":
    if image_mode is not None:
        raise ConfigError(f"image_mode {image_mode!r} does not apply to a LLaVA-OneVision model: it tiles a "
                          f"prompt's only image at its own aspect and pads each of several to a square")
    tokenizer = ck.tokenizer
    image_token = tokenizer.config.get("image_token") or IMAGE_PLACEHOLDER
    if tokenizer.token_id(image_token) != cfg.image_token_id:
        found = tokenizer.tok.id_to_token(cfg.image_token_id) if cfg.image_token_id is not None else None
        if found is None:
            raise ConfigError(f"config image_token_index {cfg.image_token_id} is not in the tokenizer's vocabulary")
        image_token = found
    if not ck.template:
        raise ConfigError(f"{ck.path} has no chat template (chat_template.jinja, chat_template.json or "
                          f"tokenizer_config.json's chat_template): a LLaVA-OneVision prompt cannot be built")
    _check_processor_settings(cfg, ck.path)
    prompt = PromptBuilder(tokenizer, ck.template, cfg.image_token_id, cfg.image_tokens_per_image + 1, image_token)
    return OnevisionProcessor(cfg, prompt, image_config(cfg, ck.image_processor))


def image_config(cfg: OnevisionConfig, d: dict | None) -> ImageProcessorConfig:
    """preprocessor_config.json -> the per-view preprocessing (resize to the tile, rescale, normalize); the
    tiling is the config's pinpoints, which must be the image processor's."""
    d = d or {}
    kind = d.get("image_processor_type")
    if kind is not None and kind not in IMAGE_PROCESSOR_TYPES:
        raise ConfigError(f"image processor {kind!r} is not LLaVA-OneVision's ({', '.join(IMAGE_PROCESSOR_TYPES)})")
    v = IMAGE_PROCESSOR_DEFAULTS | {k: x for k, x in d.items() if x is not None}
    s = cfg.vision.image_size
    if d and anyres.check_pinpoints(v["image_grid_pinpoints"]) != cfg.image_grid_pinpoints:
        raise ConfigError(f"the image processor's image_grid_pinpoints {[list(p) for p in v['image_grid_pinpoints']]} "
                          f"differ from config.json's {[list(p) for p in cfg.image_grid_pinpoints]}")
    size = v["size"]
    side = size.get("shortest_edge") if isinstance(size, dict) and "shortest_edge" in size else None
    if side is None and not (isinstance(size, dict) and size.get("height") == size.get("width")):
        raise ConfigError(f"preprocessor_config.json size {size!r} is not a square tile ({{'height': {s}, "
                          f"'width': {s}}})")
    side = side or size["height"]
    crop = v["crop_size"]
    if side != s or (v["do_center_crop"] and crop not in (None, {"height": s, "width": s})) or not v["do_resize"]:
        raise ConfigError(f"preprocessor_config.json (size {size}, crop_size {crop}, do_resize {v['do_resize']}) "
                          f"does not make the {s}x{s} px tiles the vision tower (vision_config.image_size) takes")
    return ImageProcessorConfig(size={"height": s, "width": s}, crop_size=None, do_center_crop=False, do_resize=True,
                                do_rescale=bool(v["do_rescale"]), do_normalize=bool(v["do_normalize"]),
                                rescale_factor=float(v["rescale_factor"]), image_mean=v["image_mean"],
                                image_std=v["image_std"], resample=int(v["resample"]), mode="resize")


def _check_processor_settings(cfg: OnevisionConfig, folder: Path) -> None:
    """processor_config.json's own copies of what the count depends on: HF's processor counts with them, the
    model packs with config.json's; where they differ transformers refuses the prompt, and so does this."""
    path = Path(folder) / "processor_config.json"
    if not path.is_file():
        return
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    aspect = d.get("vision_aspect_ratio")
    if aspect is not None and aspect != cfg.vision_aspect_ratio:
        raise ConfigError(f"processor_config.json vision_aspect_ratio {aspect!r} differs from config.json's "
                          f"{cfg.vision_aspect_ratio!r}")
    n = d.get("num_image_tokens")
    with_cls = cfg.vision.num_patches + (0 if cfg.vision.is_siglip else 1)
    if n is not None and n != with_cls:
        raise ConfigError(f"processor_config.json num_image_tokens {n} is not the vision tower's {with_cls} "
                          f"features per tile")


class OnevisionProcessor(LlavaProcessor):
    """Messages -> token ids; a prompt's only image is tiled, each of several takes one padded view."""

    def __init__(self, cfg: OnevisionConfig, prompt: PromptBuilder, image_config: ImageProcessorConfig):
        super().__init__(cfg, prompt, image_config)
        self.square_config = replace(image_config, mode="pad")

    @property
    def model_name(self) -> str:
        return "a LLaVA-OneVision model"

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Tokens of a (height, width) image that is its prompt's only one."""
        return self.cfg.image_tokens(size)

    def _chunks(self, sources, limits, budget) -> list[ImageChunk]:
        loaded = [load_image(src, limits) for src in sources]
        tiled = len(loaded) == 1
        counts = [self.cfg.image_tokens((im.height, im.width), tiled) for im in loaded]
        _check_budget(counts, loaded, budget)
        return [ImageChunk(im, n, options=tiled, variant="" if tiled else SQUARE_VARIANT)
                for im, n in zip(loaded, counts)]

    def prepare(self, messages, limits, budget=None) -> Prepared:
        template_messages, sources = normalize_messages(messages, self.prompt.template, model=self.model_name)
        self.prompt.build(template_messages, n_images=len(sources))     # prompt errors before decoding
        chunks = self._chunks(sources, limits, budget)
        inputs = self.prompt.build(template_messages, n_images=len(chunks), image_tokens=[c.n_tokens for c in chunks])
        return Prepared(inputs.input_ids, inputs.image_mask, chunks, text=inputs.text)

    def count_tokens(self, messages, limits, budget=None) -> int:
        template_messages, sources = normalize_messages(messages, self.prompt.template, model=self.model_name)
        chunks = self._chunks(sources, limits, budget)
        return len(self.prompt.build(template_messages, n_images=len(chunks),
                                     image_tokens=[c.n_tokens for c in chunks]).input_ids)

    def views(self, image, tiled: bool = True) -> torch.Tensor:
        """One image -> (1 + tiles, 3, S, S) (the base view, then the tiles row-major), or, untiled, (1, 3, S, S)
        (padded to a square in the mean colour, then resized), as LlavaOnevisionImageProcessorPil makes them."""
        if not tiled:
            return preprocess(image, self.square_config)[None]
        s = self.cfg.vision.image_size
        views = anyres.tile_views(to_rgb(image), self.cfg.image_grid_pinpoints, s, s, self.image_config.resample)
        return torch.stack([preprocess(v, self.image_config) for v in views])

    def pixels(self, chunks: list[ImageChunk]):
        """[(views, (height, width), tiled)] for OnevisionModel.encode."""
        return [(self.views(c.image.image, c.options), c.size, c.options) for c in chunks]
