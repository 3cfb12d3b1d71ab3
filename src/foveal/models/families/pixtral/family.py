"""The Pixtral family: Pixtral-12B (HF `llava` with a `pixtral` vision_config) and Mistral 3
(`mistral3`: Mistral Small 3.1 / 3.2).

A ViT over 16-px (Mistral 3: 14-px) patches at the image's own resized size with 2-D RoPE and
block-diagonal attention over the images (vision.py), a projector (Mistral 3's first RMS-normalises
and merges 2x2 patches), and the shared Mistral decoder (models.text) with plain 0..T-1 positions.

Design decisions:
- The config mapping (config.py) keeps each shape's own transformers defaults: LlavaConfig's or
  Mistral3Config's, with PixtralVisionConfig's for a sparse vision_config.
- Checkpoint names: the shared rules (`language_model.model.*`, `model.language_model.*`,
  `model.vision_tower.*`, `model.multi_modal_projector.*`) already give this module's names.
- An image is `[IMG]` in the chat template; the prompt builder replaces it with the image's rows of
  `[IMG]` tokens, each ended by `[IMG_BREAK]` and the last by `[IMG_END]`, known from the image's size
  before a pixel is read (image_processing.py). Only the `[IMG]` tokens take embedding rows: an image's
  `n_tokens` counts those (the break / end tokens are ordinary text tokens).
- The processor's settings are PixtralProcessor's, read from processor_config.json (patch_size,
  spatial_merge_size, the three token strings); a file that disagrees with the tower is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ....errors import ConfigError, PromptError
from ....processing.images import load_image
from ....processing.prompt import PromptBuilder, normalize_messages
from ...cpu import matmuls
from ...interface import Checkpoint, ImageChunk, Prepared
from ...vlm import DecoderVLM
from .config import PixtralConfig, config  # noqa: F401  (config is the family's entry point)
from .image_processing import PixtralImageConfig, image_text, process_images, token_grid
from .vision import LlavaProjector, Mistral3Projector, PixtralVisionTower
from ..common import config_as_loaded, processor_settings

NAME = "pixtral"
TOKENS = dict(image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")


def complete(cfg: PixtralConfig, ck: Checkpoint, vision_tower=None) -> None:
    """Nothing to attach: the tower is inside the checkpoint, under names the shared rules map."""
    if vision_tower is not None:
        raise ConfigError("vision_tower=PATH applies to the original LLaVA layout only; a Pixtral checkpoint holds "
                          "its own tower")


def hf_name(name: str, cfg: PixtralConfig) -> str:
    """Module name -> checkpoint name, as transformers 5 names the model in memory."""
    if name.startswith(("vision_tower.", "multi_modal_projector.", "language_model.")):
        return "model." + name
    return name


def config_to_hf(cfg: PixtralConfig, raw: dict) -> dict:
    """config.json for a checkpoint foveal writes of this model: the one it was read from."""
    return config_as_loaded(raw, "a Pixtral")


def build(cfg: PixtralConfig) -> "PixtralModel":
    return PixtralModel(cfg)


def processor(cfg: PixtralConfig, ck: Checkpoint, image_mode: str | None = None) -> "PixtralProcessor":
    if image_mode is not None:
        raise ConfigError(f"image_mode {image_mode!r} does not apply to a Pixtral model: it keeps each image's "
                          f"aspect at its own resolution")
    settings = processor_settings(ck)
    # PixtralProcessor's defaults are 16-px patches, no merge; without a processor_config.json the tower's own
    patch = settings.get("patch_size", cfg.vision.patch_size if not settings else 16)
    merge = settings.get("spatial_merge_size", cfg.spatial_merge_size if not settings else 1)
    if (patch, merge) != (cfg.vision.patch_size, cfg.spatial_merge_size):
        raise ConfigError(f"processor_config.json cuts {patch}-px patches merged {merge}x{merge}, but the model "
                          f"(config.json) takes {cfg.vision.patch_size}-px patches merged "
                          f"{cfg.spatial_merge_size}x{cfg.spatial_merge_size}")
    tokens = {k: settings.get(k, v) for k, v in TOKENS.items()}
    tokenizer = ck.tokenizer
    for key, token in tokens.items():
        if tokenizer.token_id(token) is None:
            raise ConfigError(f"the tokenizer has no {token} token ({key}): a Pixtral prompt cannot mark images")
    if tokenizer.token_id(tokens["image_token"]) != cfg.image_token_id:
        raise ConfigError(f"config image_token_index {cfg.image_token_id} is not the tokenizer's "
                          f"{tokens['image_token']} ({tokenizer.token_id(tokens['image_token'])})")
    if not ck.template:
        raise ConfigError(f"{ck.path} has no chat template (chat_template.jinja or tokenizer_config.json's "
                          f"chat_template): a Pixtral prompt cannot be built without it")
    image_config = PixtralImageConfig.from_hf(ck.image_processor or {}, cfg.tokens_patch)
    prompt = PromptBuilder(tokenizer, ck.template, cfg.image_token_id, 1, tokens["image_token"])
    return PixtralProcessor(cfg, prompt, image_config, tokens)


def describe(cfg: PixtralConfig, processor: "PixtralProcessor | None" = None) -> dict:
    """image_tokens_per_image: a 336x336 image's count (the count follows each image's size, up to
    longest_edge / token patch per side)."""
    ipc = processor.image_config if processor is not None else PixtralImageConfig(
        longest_edge=cfg.vision.image_size, patch_size=cfg.tokens_patch)
    rows, cols = token_grid(336, 336, ipc)
    side = ipc.longest_edge // ipc.patch_size + (ipc.longest_edge % ipc.patch_size > 0)
    return {
        "family": NAME,
        "architecture": cfg.architecture,
        "layout": cfg.kind,
        "language_model": cfg.text.model_type,
        "vision_tower": "pixtral",
        "vision_family": "pixtral",
        "projector": "mlp2x_gelu" if cfg.kind == "llava" else "patch_merger",
        "image_size": None,
        "patch_size": cfg.vision.patch_size,
        "vision_layers": cfg.vision.num_hidden_layers,
        "vision_hidden_size": cfg.vision.hidden_size,
        "image_tokens_per_image": rows * cols,
        "max_image_tokens": side * side,
        "longest_edge": ipc.longest_edge,
        "spatial_merge_size": cfg.spatial_merge_size,
        "image_grid_pinpoints": None,
    }


# ---- memory planning (plan.py asks) ------------------------------------------------------------
def plan_complete(cfg: PixtralConfig, folder: Path | None) -> list[str]:
    return []


def plan_vision(cfg: PixtralConfig, images: int, dbytes: int, image_processor: dict | None = None,
                processor: "PixtralProcessor | None" = None) -> tuple[int, int, list[str]]:
    """Planned at the largest image (longest_edge square): (its [IMG] tokens, the tower's activations for
    `images` such images in one batch, a note). Each image also takes one break / end token per row."""
    ipc = processor.image_config if processor is not None else PixtralImageConfig.from_hf(
        image_processor or {"size": {"longest_edge": cfg.vision.image_size}}, cfg.tokens_patch)
    side = -(-ipc.longest_edge // ipc.patch_size)
    per_image = side * side
    if images == 0:
        return per_image, 0, []
    v = cfg.vision
    n = per_image * cfg.spatial_merge_size ** 2                          # patches of one image
    pixels = 3 * (side * ipc.patch_size) ** 2 * 4 * 2                    # float32 batch + the cast copy
    layer = n * (6 * v.hidden_size + 3 * v.intermediate_size) * dbytes   # norms, q/k/v/o, residual, gated MLP
    kept = (len(cfg.feature_layers) + 1) * n * v.hidden_size * dbytes
    projector = per_image * (v.hidden_size * cfg.spatial_merge_size ** 2 + 2 * cfg.text.hidden_size) * dbytes
    attn = v.num_attention_heads * n * n * 4                             # one image's scores at a time (fp32)
    note = (f"dynamic resolution: an image takes up to {per_image} tokens (+ {side} row breaks) by its size, "
            f"longest edge fitted into {ipc.longest_edge} px; planned at the most")
    return per_image, images * (pixels + layer + kept + projector) + attn, [note]


class PixtralModel(DecoderVLM):
    parts = {"vision_tower": "vision", "multi_modal_projector": "projector", "language_model": "language_model",
             "lm_head": "language_model"}
    trainable = False
    has_vision = True

    def __init__(self, cfg: PixtralConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = PixtralVisionTower(cfg.vision)
        self.multi_modal_projector = (LlavaProjector if cfg.kind == "llava" else Mistral3Projector)(cfg)
        self._init_decoder(cfg.text)

    @property
    def vision_device(self) -> torch.device:
        return self.vision_tower.patch_conv.weight.device

    def init_buffers(self) -> None:
        super().init_buffers()
        self.vision_tower.init_rope(self.vision_device)

    def encode(self, pixels) -> list[torch.Tensor]:
        """(pixel_values (N, 3, H, W) padded, image_sizes (N, 2)) -> one (rows * cols, D) embedding per image."""
        pixel_values, sizes = pixels
        x = pixel_values.to(self.vision_device)
        sizes = [tuple(s) for s in sizes.tolist()]
        p, m = self.cfg.vision.patch_size, self.cfg.spatial_merge_size
        grids = [(h // p, w // p) for h, w in sizes]
        with matmuls(x, rows=sum(h * w for h, w in grids)):
            states = self.vision_tower(x, sizes, self.cfg.feature_layers)
            features = torch.cat(states, dim=-1) if len(states) > 1 else states[0]
            proj = self.multi_modal_projector
            out = proj(features.to(proj.linear_1.weight.dtype), grids)
        return list(out.split([(h // m) * (w // m) for h, w in grids]))


class PixtralProcessor:
    """Messages -> token ids with each image's `[IMG]` rows; positions 0..T-1."""

    def __init__(self, cfg: PixtralConfig, prompt: PromptBuilder, image_config: PixtralImageConfig, tokens: dict):
        self.cfg, self.prompt, self.image_config, self.tokens = cfg, prompt, image_config, tokens

    def image_tokens(self, size: tuple[int, int]) -> int:
        rows, cols = token_grid(size[0], size[1], self.image_config)
        return rows * cols

    def _text(self, size: tuple[int, int]) -> str:
        rows, cols = token_grid(size[0], size[1], self.image_config)
        return image_text(rows, cols, self.tokens["image_token"], self.tokens["image_break_token"],
                          self.tokens["image_end_token"])

    def _build(self, messages, limits, budget=None):
        template_messages, sources = normalize_messages(messages, self.prompt.template, model="a Pixtral model")
        self.prompt.build(template_messages, n_images=len(sources))       # placeholder errors before decoding
        loaded = [load_image(src, limits) for src in sources]
        counts = [self.image_tokens((im.height, im.width)) for im in loaded]
        _check_budget(counts, loaded, budget)
        inputs = self.prompt.build(template_messages, n_images=len(loaded), image_tokens=counts,
                                   image_texts=[self._text((im.height, im.width)) for im in loaded])
        return inputs, [ImageChunk(im, n) for im, n in zip(loaded, counts)]

    def prepare(self, messages, limits, budget=None) -> Prepared:
        inputs, chunks = self._build(messages, limits, budget)
        return Prepared(inputs.input_ids, inputs.image_mask, chunks, text=inputs.text)

    def count_tokens(self, messages, limits, budget=None) -> int:
        return len(self._build(messages, limits, budget)[0].input_ids)

    def pixels(self, chunks: list[ImageChunk]):
        """(pixel_values (N, 3, H_max, W_max) zero-padded, image_sizes (N, 2)), as PixtralImageProcessorPil."""
        return process_images([c.image.image for c in chunks], self.image_config)


def _check_budget(counts: list[int], images, budget) -> None:
    """An image's token count follows from its size and longest_edge: a request's budget is kept or refused."""
    if not budget:
        return
    lo, hi = budget
    for n, im in zip(counts, images):
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            raise PromptError(f"an image of {im.width}x{im.height} px takes {n} tokens on this model, outside the "
                              f"request's image-token budget ({lo or 1}-{hi or 'any'}); Pixtral images are not "
                              f"resized to a budget")
