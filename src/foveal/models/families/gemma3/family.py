"""The Gemma 3 family (`Gemma3ForConditionalGeneration`, model_type gemma3): images at a fixed size.

A SigLIP tower (models.vision, with its post_layernorm) over the image resized to the tower's size; its
patch grid average-pooled to `mm_tokens_per_image` rows, each RMS-normed ((1 + w), the "soft embedding
norm") and projected by one matrix (`Gemma3MultiModalProjector`); Gemma 3's decoder (text.py).

Design decisions:
- An image is what Gemma3Processor writes for the chat template's `<start_of_image>`:
  "\\n\\n<start_of_image>" + "<image_soft_token>" x mm_tokens_per_image + "<end_of_image>\\n\\n"; the soft
  tokens are the image rows (the image mask). The token strings are the tokenizer config's `boi_token`,
  `image_token`, `eoi_token` (else the config's ids' tokens), checked against config.json's ids.
- Bidirectional attention among the rows of one image, as HF builds it for a prefill from token_type_ids:
  `embed` sees the image mask and keeps its block ids for the `forward` that follows (the prefill, sliced
  to the tokens it prefills after a reused prefix), which hands them to the decoder and forgets them (as
  Qwen3-VL keeps its deepstack rows). A decode step needs no mask beyond the sliding window.
- Pixels: Gemma3ImageProcessor's resize to size (bilinear), rescale and normalize (mean = std = 0.5) with
  processing.images' HF-exact steps. With `do_pan_and_scan` (pan_and_scan.py), a wide or tall image is also
  shown as crops: one ImageChunk per image whose views are [image, crops...], each taking mm_tokens_per_image
  rows, with HF's "Here is the original image ... crops" text around them; `pixels` returns the views and the
  count per image, `encode` joins each image's rows. The setting is the checkpoint's, not a request's (the
  request seam has no per-request processor options).
- Checkpoint names are the shared rules' (`language_model.model.*` / `model.language_model.*`,
  `vision_tower.vision_model.*` / `model.vision_tower.vision_model.*`, `multi_modal_projector.*`).
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from ....errors import ConfigError, PromptError
from ....processing.images import ImageProcessorConfig, load_image, preprocess_batch
from ....processing.prompt import PromptBuilder, normalize_messages
from ...cpu import matmuls
from ...interface import Checkpoint, ImageChunk, Prepared
from ...vision import VisionTower
from ...vlm import DecoderVLM
from .config import ARCHITECTURE, NAME, Gemma3Config, config  # noqa: F401 - config is the family's
from .pan_and_scan import PanAndScan, image_text
from .text import Gemma3TextModel, GemmaRMSNorm, image_blocks
from ..common import config_as_loaded

# Gemma3ImageProcessor's class defaults (transformers 5.25, both backends)
IMAGE_DEFAULTS = dict(size={"height": 224, "width": 224}, do_resize=True, do_rescale=True, do_normalize=True,
                      rescale_factor=1 / 255, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), resample=2)
TOKEN_NAMES = dict(boi_token="boi_token_id", image_token="image_token_id", eoi_token="eoi_token_id")


def complete(cfg: Gemma3Config, ck: Checkpoint, vision_tower=None) -> None:
    """Nothing to attach or rename: the shared name rules cover every layout transformers saves."""


def build(cfg: Gemma3Config) -> "Gemma3Model":
    return Gemma3Model(cfg)


def hf_name(name: str, cfg: Gemma3Config) -> str:
    """Module name -> checkpoint name, as transformers 5 saves the model."""
    if name.startswith("vision_tower."):
        return "model.vision_tower.vision_model." + name[len("vision_tower."):]
    if name.startswith(("language_model.", "multi_modal_projector.")):
        return "model." + name
    return name


def config_to_hf(cfg: Gemma3Config, raw: dict) -> dict:
    return config_as_loaded(raw, "a Gemma 3")


def image_config(cfg: Gemma3Config, d: dict | None) -> ImageProcessorConfig:
    """preprocessor_config.json (Gemma3ImageProcessor's keys; absent or null ones take its defaults)."""
    d = {k: v for k, v in (d or {}).items() if v is not None}
    v = IMAGE_DEFAULTS | {k: d[k] for k in IMAGE_DEFAULTS if k in d}
    size = v["size"]
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not (isinstance(size, dict) and set(size) == {"height", "width"}):
        raise ConfigError(f"preprocessor_config.json size must be {{'height': H, 'width': W}} for Gemma 3, "
                          f"got {size!r}")
    ipc = ImageProcessorConfig(size=size, crop_size=None, do_center_crop=False, do_resize=bool(v["do_resize"]),
                               do_rescale=bool(v["do_rescale"]), do_normalize=bool(v["do_normalize"]),
                               rescale_factor=float(v["rescale_factor"]), image_mean=v["image_mean"],
                               image_std=v["image_std"], resample=int(v["resample"]), mode="resize")
    s = cfg.vision.image_size
    if not ipc.do_resize or (size["height"], size["width"]) != (s, s):
        raise ConfigError(f"the image processor (preprocessor_config.json size / do_resize) makes "
                          f"{size['width']}x{size['height']} px images, but the vision tower (vision_config."
                          f"image_size) takes {s}x{s}; make them agree")
    return ipc


def _token(tokenizer, cfg: Gemma3Config, key: str) -> str:
    """The token string for boi_token / image_token / eoi_token, checked against config.json's id."""
    want = getattr(cfg, TOKEN_NAMES[key])
    given = tokenizer.config.get(key)
    given = given.get("content") if isinstance(given, dict) else given
    found = tokenizer.tok.id_to_token(want)
    if given is not None and tokenizer.token_id(given) != want:
        raise ConfigError(f"tokenizer_config.json's {key} {given!r} is id {tokenizer.token_id(given)}, but "
                          f"config.json says {want} ({found!r})")
    if given is None and found is None:
        raise ConfigError(f"config.json's {TOKEN_NAMES[key]} {want} is not in the tokenizer's vocabulary")
    return given or found


def processor(cfg: Gemma3Config, ck: Checkpoint, image_mode: str | None = None) -> "Gemma3Processor":
    if image_mode is not None:
        raise ConfigError(f"image_mode {image_mode!r} does not apply to a Gemma 3 model: its processor resizes "
                          f"every image to the tower's square")
    if not ck.template:
        raise ConfigError(f"{ck.path} has no chat template (chat_template.jinja or tokenizer_config.json's "
                          f"chat_template): a Gemma 3 prompt cannot be built without it")
    boi, soft, eoi = (_token(ck.tokenizer, cfg, k) for k in ("boi_token", "image_token", "eoi_token"))
    prompt = PromptBuilder(ck.tokenizer, ck.template, cfg.image_token_id, cfg.mm_tokens_per_image, boi)
    # Gemma3Processor.full_image_sequence: what each <start_of_image> becomes
    sequence = f"\n\n{boi}{soft * cfg.mm_tokens_per_image}{eoi}\n\n"
    return Gemma3Processor(cfg, prompt, image_config(cfg, ck.image_processor), sequence,
                           PanAndScan.from_hf(ck.image_processor or {}))


def describe(cfg: Gemma3Config, processor=None) -> dict:
    v, t = cfg.vision, cfg.text
    pas = getattr(processor, "pan_and_scan", None)
    return {
        "family": NAME,
        "architecture": cfg.architecture,
        "layout": NAME,
        "language_model": t.model_type,
        "vision_tower": v.model_type,
        "vision_family": "siglip",
        "projector": "avg_pool+rms_norm+linear",
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "vision_layers": v.num_hidden_layers,
        "vision_hidden_size": v.hidden_size,
        "image_tokens_per_image": cfg.mm_tokens_per_image,
        "max_image_tokens": cfg.mm_tokens_per_image * (1 + (pas.max_num_crops if pas else 0)),
        "pan_and_scan": pas is not None,
        "image_grid_pinpoints": None,
        "sliding_window": t.sliding_window,
        "global_layers": [i for i in range(t.num_hidden_layers) if not t.is_sliding(i)],
    }


def plan_complete(cfg: Gemma3Config, folder) -> list[str]:
    return []


def plan_vision(cfg: Gemma3Config, images: int, dbytes: int, image_processor: dict | None = None,
                processor=None) -> tuple[int, int, list[str]]:
    """(tokens per image, bytes of activations to encode `images` images in one batch, notes)."""
    per_image, v = cfg.mm_tokens_per_image, cfg.vision
    pas = PanAndScan.from_hf(image_processor or {})
    views = 1 + (pas.max_num_crops if pas else 0)          # at most: the image and its crops
    per_image *= views
    images *= views
    if images == 0:
        return per_image, 0, []
    t = v.num_patches
    pixels = 3 * v.image_size ** 2 * 4 * 2                          # float32 preprocess output + its copy
    kept = (v.num_hidden_layers + 1) * t * v.hidden_size * dbytes   # VisionTower keeps each hidden state
    layer = t * (6 * v.hidden_size + 2 * v.intermediate_size) * dbytes
    attn = v.num_attention_heads * t * t * 4
    projector = (t * v.hidden_size * 4 + per_image * cfg.text.hidden_size * dbytes) * 2
    return per_image, images * (pixels + kept + layer + attn + projector), []


class Gemma3VisionTower(VisionTower):
    """SigLIP's last hidden state after its post_layernorm (SiglipVisionModel's last_hidden_state)."""

    def __init__(self, cfg):
        super().__init__(cfg, [-1])
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(super().forward(pixels)[0])          # (B, patches, Dv)


class Gemma3Projector(nn.Module):
    """Gemma3MultiModalProjector: (B, patches, Dv) -> avg-pooled (B, mm_tokens, Dv) -> (1 + w) RMSNorm ->
    @ mm_input_projection_weight (Dv, Dt)."""

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        v = cfg.vision
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(v.hidden_size, cfg.text.hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(v.hidden_size, v.layer_norm_eps)
        self.patches_per_side = v.image_size // v.patch_size
        self.kernel = cfg.pool_kernel

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        B, _, D = states.shape
        grid = states.transpose(1, 2).reshape(B, D, self.patches_per_side, self.patches_per_side).contiguous()
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)   # (B, mm_tokens, Dv)
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).type_as(states)


class Gemma3Model(DecoderVLM):
    parts = {"vision_tower": "vision", "multi_modal_projector": "projector", "language_model": "language_model",
             "lm_head": "language_model"}
    trainable = False       # the trainer's forward has no image-span mask yet
    has_vision = True

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = Gemma3VisionTower(cfg.vision)
        self.multi_modal_projector = Gemma3Projector(cfg)
        self.language_model = Gemma3TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self._blocks = None         # the image block ids embed() saw, until the prefill

    @property
    def vision_device(self) -> torch.device:
        return self.vision_tower.embeddings.patch_embedding.weight.device

    def encode(self, pixels) -> list[torch.Tensor]:
        """(views (N, 3, S, S), views per image) -> one (views * mm_tokens_per_image, D_text) embedding per image;
        a bare (N, 3, S, S) is one view per image."""
        views, counts = pixels if isinstance(pixels, tuple) else (pixels, [1] * pixels.shape[0])
        x = views.to(self.vision_device)
        with matmuls(x, rows=x.shape[0] * max(self.cfg.vision.num_patches, 2)):
            rows = self.multi_modal_projector(self.vision_tower(x))                # (N, mm_tokens, D)
        return [r.reshape(-1, r.shape[-1]) for r in rows.split(counts)]

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled token embeddings with the image rows written in; keeps the image spans for the prefill."""
        embeds = super().embed(input_ids, image_mask, image_embeds)
        self._blocks = image_blocks(image_mask) if image_mask is not None and bool(image_mask.any()) else None
        return embeds

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False,
                start: int | None = None, layer_additions=None) -> torch.Tensor:
        """The prefill after `embed` (its image spans attend both ways); then the spans are forgotten."""
        blocks, self._blocks = self._blocks, None
        if layer_additions is not None:
            raise PromptError("Gemma 3 takes no per-layer additions")
        B, T = embeds.shape[:2]
        if blocks is not None and blocks.shape[0] != B:
            raise PromptError(f"the image spans are for {blocks.shape[0]} sequence(s), the prefill has {B}")
        with matmuls(embeds, rows=B * T):
            h = self.language_model(embeds, input_pos, start=start, blocks=blocks)
        if last_only:
            h = h[:, -1].unsqueeze(1)
        with matmuls(h, rows=h.shape[0] * h.shape[1]):
            return self.lm_head(h)


class Gemma3Processor:
    """Messages -> token ids with each image's `<start_of_image>` expanded as Gemma3Processor expands it (with its
    pan-and-scan crops when the checkpoint turns them on)."""

    def __init__(self, cfg: Gemma3Config, prompt: PromptBuilder, image_config: ImageProcessorConfig, sequence: str,
                 pan_and_scan: PanAndScan | None = None):
        self.cfg, self.prompt, self.image_config, self.sequence = cfg, prompt, image_config, sequence
        self.pan_and_scan = pan_and_scan

    def _boxes(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        return self.pan_and_scan.boxes(width, height) if self.pan_and_scan else []

    def _prompt(self, template_messages, crops: list[int]):
        n = self.cfg.mm_tokens_per_image
        return self.prompt.build(template_messages, n_images=len(crops), image_tokens=[n * (1 + c) for c in crops],
                                 image_texts=[image_text(self.sequence, c) for c in crops])

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Tokens of an image of (height, width) `size`: its own, and its crops'."""
        return self.cfg.mm_tokens_per_image * (1 + len(self._boxes(*size)))

    def _build(self, messages, limits, budget=None):
        template_messages, sources = normalize_messages(messages, self.prompt.template, model="a Gemma 3 model")
        if self.pan_and_scan is None:
            inputs = self._prompt(template_messages, [0] * len(sources))   # prompt errors before decoding
            loaded = [load_image(src, limits) for src in sources]
            boxes = [[] for _ in loaded]
        else:                       # the crops, and so the prompt, depend on each image's size
            loaded = [load_image(src, limits) for src in sources]
            boxes = [self._boxes(im.height, im.width) for im in loaded]
            inputs = self._prompt(template_messages, [len(b) for b in boxes])
        n = self.cfg.mm_tokens_per_image
        chunks = [ImageChunk(im, n * (1 + len(b)), options=b) for im, b in zip(loaded, boxes)]
        if budget and chunks:
            lo, hi = budget
            for c in chunks:
                if (lo is not None and c.n_tokens < lo) or (hi is not None and c.n_tokens > hi):
                    raise PromptError(f"a Gemma 3 image of {c.size[1]}x{c.size[0]} px takes {c.n_tokens} tokens, "
                                      f"outside the request's image-token budget ({lo or 1}-{hi or 'any'})")
        return inputs, chunks

    def prepare(self, messages, limits, budget=None) -> Prepared:
        inputs, chunks = self._build(messages, limits, budget)
        return Prepared(inputs.input_ids, inputs.image_mask, chunks, text=inputs.text)

    def count_tokens(self, messages, limits, budget=None) -> int:
        if self.pan_and_scan is not None or budget:
            return len(self._build(messages, limits, budget)[0].input_ids)
        template_messages, sources = normalize_messages(messages, self.prompt.template, model="a Gemma 3 model")
        return len(self._prompt(template_messages, [0] * len(sources)).input_ids)

    def pixels(self, chunks: list[ImageChunk]) -> tuple[torch.Tensor, list[int]]:
        """(views (N, 3, S, S) float32: each image, then its crops; views per image)."""
        views = []
        for c in chunks:
            image = c.image.image
            views += [image, *(image.crop(box) for box in c.options or ())]
        return preprocess_batch(views, self.image_config), [1 + len(c.options or ()) for c in chunks]
