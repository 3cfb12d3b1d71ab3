"""The family contract: what the engine, the API and the server may ask of a model family.

A family is one module under `foveal.models.families` (found through `models.registry`). It owns
everything that differs between VLM families: how its config.json maps onto config dataclasses,
how checkpoint names map onto its modules, its modules, its image processor, and how an image
becomes tokens and positions. Everything outside the family module talks to it through the
names below, so adding a family never adds a branch to the engine, the API or the server.

Design decisions (after llama.cpp's mtmd, vLLM's model interfaces and mlx-vlm's models/<family>/):
- A prompt is prepared once into `Prepared`: token ids with image slots, the images in prompt
  order as `ImageChunk`s (content hash, token count), and the RoPE positions when they are not
  simply 0..T-1 (M-RoPE's (3, T)). Positions are tracked apart from token counts from day one.
- A video is a `VideoChunk` among the images (a family without video refuses it while preparing):
  keyed by its content hash and the frames sampled from it, decoded only on a cache miss.
- Pixels are made only for the images the engine's embedding cache does not hold
  (`Processor.pixels`), and encoded by the model (`VisionLanguageModel.encode`); the language
  model only ever receives embeddings and positions.
- Every family's model names its decoder `language_model` (a `models.text.TextModel`), its head
  `lm_head` and its config's text part `cfg.text`: GPU-layer placement, the KV cache and the
  planner's per-layer counts rest on that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..processing.images import LoadedImage
from ..processing.video import LoadedVideo


@dataclass
class ImageChunk:
    """One image of a prompt (mtmd_input_chunk of type IMAGE)."""
    image: LoadedImage           # decoded and validated; .sha256 is the cache key
    n_tokens: int                # slots it takes in the sequence
    options: Any = None          # the family's preprocessing settings for it (a request's pixel budget)
    variant: str = ""            # what besides the pixels its embedding depends on (that budget)
    kind = "image"
    frames = 0

    @property
    def key(self) -> str:
        return self.image.sha256 + self.variant

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)"""
        return self.image.height, self.image.width


@dataclass
class VideoChunk:
    """One video of a prompt: probed (not decoded) and the frames the family sampled from it. The
    engine treats it as an ImageChunk: a key, a token count, pixels from the processor."""
    video: LoadedVideo           # .sha256 hashes the encoded file (or the frames)
    n_tokens: int
    indices: list[int]           # the sampled frames
    options: Any = None          # the family's settings for it (pixel budget, time spacing)
    variant: str = ""            # the budget; the sampled frames are part of the key already
    kind = "video"

    @property
    def key(self) -> str:
        sampled = hashlib.sha256(",".join(map(str, self.indices)).encode()).hexdigest()[:16]
        return f"{self.video.sha256}:frames={sampled}{self.variant}"

    @property
    def frames(self) -> int:
        return len(self.indices)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of a frame"""
        return self.video.height, self.video.width


@dataclass
class Prepared:
    """Messages and images, ready for the engine."""
    input_ids: list[int]                     # image slots hold a placeholder id
    image_mask: list[bool]                   # True at image slots
    images: list[ImageChunk | VideoChunk] = field(default_factory=list)   # images and videos, in prompt order
    positions: torch.Tensor | None = None    # (T,) or (3, T); None: 0..T-1
    next_position: int | None = None         # RoPE position of the first generated token; None: T
    text: str = ""                           # the rendered prompt before expansion


@dataclass
class Checkpoint:
    """A checkpoint opened by `api.load`, whatever its format (HF folder or GGUF): a family may
    complete it (LLaVA's original layout keeps the vision tower in another folder) or rename its
    tensors (`sources`: canonical name -> (file, stored name)) before the model is built."""
    path: Path
    raw_config: dict
    sources: dict
    tokenizer: Any
    template: str | None
    image_processor: dict | None
    generation_config: dict


class Processor(Protocol):
    """Messages -> `Prepared`, for one loaded model."""
    image_config: Any                        # the family's image-processing settings (None: text only)

    # budget: (min, max) image tokens of the request (SamplingOptions.image_budget), or None
    def prepare(self, messages, limits, budget=None) -> Prepared: ...
    def count_tokens(self, messages, limits, budget=None) -> int: ...
    def pixels(self, chunks: list[ImageChunk | VideoChunk]) -> Any: ...   # what `encode` takes, for these
    def image_tokens(self, size: tuple[int, int]) -> int: ...    # tokens one (height, width) image takes
    # optional, for training: RoPE positions ((3, T) M-RoPE) of built ids whose images have these sizes;
    # absent where positions are 0..T-1
    # def positions(self, input_ids, image_mask, sizes) -> torch.Tensor: ...


class VisionLanguageModel(Protocol):
    """A family's model as the engine sees it (an nn.Module)."""
    cfg: Any
    language_model: torch.nn.Module
    parts: dict[str, str]                    # top-level module name -> "vision" | "projector" | "language_model"
                                             # (a dotted key: a submodule in another part, for training)
    trainable: bool                          # `foveal train` may run its training forward (train/trainer.py)

    @property
    def input_device(self) -> torch.device: ...
    def encode(self, pixels) -> list[torch.Tensor]: ...          # one (n_tokens, D) per image / video
    def embed(self, input_ids, image_mask, image_embeds) -> torch.Tensor: ...
    def forward(self, embeds, positions, last_only: bool = False, start: int | None = None) -> torch.Tensor: ...
    def decode(self, token, position, kv_len: int) -> torch.Tensor: ...
    def compile_decode(self) -> None: ...


class Family(Protocol):
    """The module attributes of a family (`foveal.models.families.<name>`)."""
    NAME: str                                # as `foveal info` shows it
    def config(self, raw: dict) -> Any: ...
    def complete(self, cfg, checkpoint: Checkpoint, vision_tower=None) -> None: ...
    def build(self, cfg) -> VisionLanguageModel: ...
    def processor(self, cfg, checkpoint: Checkpoint, image_mode: str | None) -> Processor: ...
    def describe(self, cfg, processor=None) -> dict: ...
    # writing a checkpoint of the model (a quantized one): module name -> checkpoint name, and config.json
    def hf_name(self, name: str, cfg) -> str: ...
    def config_to_hf(self, cfg, raw: dict) -> dict: ...
    # memory planning (plan.py): a config from files alone (no weights), and what images cost
    def plan_complete(self, cfg, folder: Path | None) -> list[str]: ...
    def plan_vision(self, cfg, images: int, dbytes: int, image_processor: dict | None = None,
                    processor: Processor | None = None) -> tuple[int, int, list[str]]: ...
