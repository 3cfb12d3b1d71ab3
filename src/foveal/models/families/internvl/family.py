"""The InternVL family (`InternVLForConditionalGeneration`, model_type internvl): transformers 5.25's port of
InternVL 2.5 / 3.

InternViT over square tiles (vision.py), its patch grid pixel-shuffled 2x2 into one token per four
patches, a LayerNorm + 2-layer MLP projector, and the shared decoder (Qwen2 in every HF port; llama
reads too). An image is tiled by its aspect (image_processing.py) and takes image_seq_length tokens
per tile, written `<img><IMG_CONTEXT>...</img>`; positions are the plain 0..T-1.

Design decisions:
- The chat template writes one `<IMG_CONTEXT>` per image; the prompt builder expands it to the
  image's tiles x image_seq_length context tokens inside `<img>` ... `</img>` (InternVLProcessor's
  replace_image_token). The three token strings are the tokenizer's (`start_image_token`,
  `context_image_token`, `end_image_token` in tokenizer_config.json, as HF reads them); the
  context token must be config.json's image_token_id.
- image_seq_length is the processor's (processor_config.json), else config.json's; it must equal
  the tokens a tile makes, which transformers never checks (it fails at the feature merge).
- An image's token count follows from its size (its tile grid); a request's image-token budget is
  kept or refused, never met by re-tiling (HF has no such setting per request).
- Checkpoint names are HF's, through the shared rules (`model.vision_tower.*`, the 5.25 save's
  `language_model.model.*`); a tied head (InternVLConfig's default) has no `lm_head` tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ....errors import ConfigError, PromptError
from ....processing.images import load_image
from ....processing.prompt import PromptBuilder, normalize_messages
from ...cpu import matmuls
from ...interface import Checkpoint, ImageChunk, Prepared
from ...vlm import DecoderVLM
from .config import InternVLConfig, config  # noqa: F401  (config is the family's entry point)
from .image_processing import TileConfig, tile_count, tile_grid, tiles
from .vision import InternViT, MultiModalProjector, pixel_shuffle
from ..common import config_as_loaded

NAME = "internvl"
# InternVL's tokenizer_config.json keys and the strings its checkpoints give them
IMAGE_TOKENS = {"start_image_token": "<img>", "context_image_token": "<IMG_CONTEXT>", "end_image_token": "</img>"}


def complete(cfg: InternVLConfig, ck: Checkpoint, vision_tower=None) -> None:
    return None


def build(cfg: InternVLConfig) -> "InternVLModel":
    return InternVLModel(cfg)


def hf_name(name: str, cfg: InternVLConfig) -> str:
    """Module name -> checkpoint name, as transformers 5 names the model in memory."""
    if name.startswith(("vision_tower.", "multi_modal_projector.", "language_model.")):
        return "model." + name
    return name


def config_to_hf(cfg: InternVLConfig, raw: dict) -> dict:
    """config.json for a checkpoint foveal writes of this model: the one it was read from."""
    return config_as_loaded(raw, "an InternVL")


def _tokens_of(tokenizer) -> dict[str, str]:
    conf = tokenizer.config or {}
    extra = conf.get("extra_special_tokens") if isinstance(conf.get("extra_special_tokens"), dict) else {}
    return {k: conf.get(k) or extra.get(k) or v for k, v in IMAGE_TOKENS.items()}


def _processor_config(ck: Checkpoint) -> dict:
    path = ck.path / "processor_config.json" if ck.path.is_dir() else None
    if path is None or not path.exists():
        return {}
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return d if isinstance(d, dict) else {}


def processor(cfg: InternVLConfig, ck: Checkpoint, image_mode: str | None = None) -> "InternVLProcessor":
    if image_mode is not None:
        raise ConfigError(f"image_mode {image_mode!r} does not apply to an InternVL model: it tiles each image "
                          f"by its aspect")
    tokenizer = ck.tokenizer
    names = _tokens_of(tokenizer)
    for key, token in names.items():
        if tokenizer.token_id(token) is None:
            raise ConfigError(f"the tokenizer has no {token} token (tokenizer_config.json's {key}): an InternVL "
                              f"prompt cannot mark its images")
    context = names["context_image_token"]
    if tokenizer.token_id(context) != cfg.image_token_id:
        raise ConfigError(f"config image_token_id {cfg.image_token_id} is not the tokenizer's {context} "
                          f"({tokenizer.token_id(context)})")
    if not ck.template:
        raise ConfigError(f"{ck.path} has no chat template (chat_template.jinja or tokenizer_config.json's "
                          f"chat_template): an InternVL prompt cannot be built without it")
    seq = _processor_config(ck).get("image_seq_length", cfg.image_seq_length)
    if seq != cfg.tokens_per_tile:
        raise ConfigError(f"processor_config.json's image_seq_length {seq!r} differs from the {cfg.tokens_per_tile} "
                          f"tokens a tile makes in this model (config.json)")
    tile_config = TileConfig.from_hf(ck.image_processor or {})
    if tile_config.tile != cfg.vision.image_size:
        raise ConfigError(f"the image processor cuts {tile_config.tile}-px tiles, but the vision tower "
                          f"(config.json: vision_config.image_size) takes {cfg.vision.image_size}-px ones; make "
                          f"the image processor's size {cfg.vision.image_size}")
    prompt = PromptBuilder(tokenizer, ck.template, cfg.image_token_id, cfg.tokens_per_tile, context,
                           image_open=names["start_image_token"], image_close=names["end_image_token"])
    return InternVLProcessor(cfg, prompt, tile_config)


def describe(cfg: InternVLConfig, processor: "InternVLProcessor | None" = None) -> dict:
    """image_tokens_per_image: one tile's (a square image's when min_patches is 1); max: every tile and
    the thumbnail."""
    tc = processor.image_config if processor is not None else TileConfig.from_hf({})
    v = cfg.vision
    return {
        "family": NAME,
        "architecture": cfg.architecture,
        "layout": "internvl",
        "language_model": cfg.text.model_type,
        "vision_tower": "internvl_vision",
        "vision_family": "internvit",
        "projector": "pixel_shuffle_mlp",
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "vision_layers": v.num_hidden_layers,
        "vision_hidden_size": v.hidden_size,
        "image_tokens_per_image": cfg.tokens_per_tile * tile_count(v.image_size, v.image_size, tc),
        "max_image_tokens": cfg.tokens_per_tile * _max_tiles(tc),
        "min_patches": tc.min_patches,
        "max_patches": tc.max_patches,
        "image_grid_pinpoints": None,
    }


def _max_tiles(tc: TileConfig) -> int:
    return 1 if not tc.tiles_on else tc.max_patches + (1 if tc.max_patches > 1 else 0)


# ---- memory planning (plan.py asks) ------------------------------------------------------------
def plan_complete(cfg: InternVLConfig, folder) -> list[str]:
    return []


def plan_vision(cfg: InternVLConfig, images: int, dbytes: int, image_processor: dict | None = None,
                processor: "InternVLProcessor | None" = None) -> tuple[int, int, list[str]]:
    """Planned at the most tiles an image takes: (its tokens, the activations to encode `images` such images
    in one batch, a note)."""
    tc = processor.image_config if processor is not None else TileConfig.from_hf(image_processor or {})
    n_tiles = _max_tiles(tc)
    per_image = cfg.tokens_per_tile * n_tiles
    if images == 0:
        return per_image, 0, []
    v = cfg.vision
    views = images * n_tiles
    t = v.grid ** 2 + 1
    pixels = 3 * v.image_size ** 2 * 4 * 2                            # float32 tiles + the cast copy
    layer = t * (6 * v.hidden_size + 2 * v.intermediate_size) * dbytes   # norms, qkv, attn out, residual, MLP
    attn = v.num_attention_heads * t * t * 4                           # SDPA's score matrix (math path, fp32)
    projector = cfg.tokens_per_tile * (v.hidden_size * cfg.shuffle ** 2 * 2 + cfg.text.hidden_size * 2) * dbytes
    note = (f"tiled: an image takes {cfg.tokens_per_tile} tokens a tile, {tc.min_patches}-{tc.max_patches} tiles by "
            f"its aspect plus a thumbnail ({per_image} tokens at most); planned at the most")
    return per_image, views * (pixels + layer + attn + projector), [note]


class InternVLModel(DecoderVLM):
    parts = {"vision_tower": "vision", "multi_modal_projector": "projector", "language_model": "language_model",
             "lm_head": "language_model"}
    has_vision = True

    def __init__(self, cfg: InternVLConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = InternViT(cfg.vision, cfg.vision_feature_layer)
        self.multi_modal_projector = MultiModalProjector(cfg)
        self._init_decoder(cfg.text)

    @property
    def vision_device(self) -> torch.device:
        return self.vision_tower.embeddings.patch_embeddings.projection.weight.device

    def encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tiles (N, 3, S, S) -> (N, tokens_per_tile, D_text): InternVLModel.get_image_features."""
        weight = self.vision_tower.embeddings.patch_embeddings.projection.weight
        x = pixels.to(weight.device, weight.dtype)
        with matmuls(x, rows=x.shape[0] * (self.cfg.vision.grid ** 2 + 1)):
            features = self.vision_tower(x)[:, 1:]                         # (N, g*g, D): CLS dropped
            N, g = features.shape[0], self.cfg.vision.grid
            features = pixel_shuffle(features.reshape(N, g, g, -1), self.cfg.downsample_ratio)
            features = features.reshape(N, -1, features.shape[-1])          # (N, tokens, D * s^2)
            proj = self.multi_modal_projector
            return proj(features.to(proj.linear_1.weight.device, proj.linear_1.weight.dtype))

    def encode(self, pixels) -> list[torch.Tensor]:
        """(tiles of every image (N, 3, S, S), tiles per image) -> one (tiles * tokens_per_tile, D) per image."""
        views, counts = pixels
        out = self.encode_tiles(views)
        return [e.reshape(-1, e.shape[-1]) for e in out.split(counts)]


class InternVLProcessor:
    """Messages -> token ids with each image's `<img><IMG_CONTEXT>*N</img>`; pixels as tiles."""

    def __init__(self, cfg: InternVLConfig, prompt: PromptBuilder, image_config: TileConfig):
        self.cfg, self.prompt, self.image_config = cfg, prompt, image_config

    def image_tokens(self, size: tuple[int, int]) -> int:
        return self.cfg.tokens_per_tile * tile_count(size[0], size[1], self.image_config)

    def tile_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(cols, rows) of an image of this (height, width)."""
        return tile_grid(size[0], size[1], self.image_config)

    def _build(self, messages, limits, budget):
        template_messages, sources = normalize_messages(messages, self.prompt.template, model="an InternVL model")
        self.prompt.build(template_messages, n_images=len(sources))     # placeholder errors before decoding
        loaded = [load_image(src, limits) for src in sources]
        counts = [self.image_tokens((im.height, im.width)) for im in loaded]
        _check_budget(counts, loaded, budget)
        inputs = self.prompt.build(template_messages, n_images=len(loaded), image_tokens=counts)
        return inputs, [ImageChunk(im, n) for im, n in zip(loaded, counts)]

    def prepare(self, messages, limits, budget=None) -> Prepared:
        inputs, chunks = self._build(messages, limits, budget)
        return Prepared(inputs.input_ids, inputs.image_mask, chunks, text=inputs.text)

    def count_tokens(self, messages, limits, budget=None) -> int:
        return len(self._build(messages, limits, budget)[0].input_ids)

    def pixels(self, chunks: list[ImageChunk]):
        """(every chunk's tiles in prompt order (N, 3, S, S), tiles per chunk)."""
        views = [tiles(c.image.image, self.image_config) for c in chunks]
        s = self.cfg.vision.image_size
        if not views:
            return torch.empty((0, 3, s, s)), []
        return torch.cat(views), [v.shape[0] for v in views]


def _check_budget(counts: list[int], images, budget) -> None:
    if not budget:
        return
    lo, hi = budget
    for n, im in zip(counts, images):
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            raise PromptError(f"an image of {im.width}x{im.height} px takes {n} tokens on this InternVL model (its "
                              f"tiles by aspect), outside the request's image-token budget ({lo or 1}-{hi or 'any'}); "
                              f"its images are not re-tiled to a budget")
