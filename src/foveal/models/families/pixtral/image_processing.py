"""Pixtral's image preprocessing and image-token layout.

Mirrors transformers 5.25 `PixtralImageProcessorPil` (models/pixtral/image_processing_pil_pixtral.py) and
`PixtralProcessor.replace_image_token` (processing_pixtral.py).

Design decisions
- The PIL backend, what AutoImageProcessor gives without torchvision: the image is shrunk (never grown)
  so its longest edge fits `size.longest_edge`, each side floored, then each side rounded *up* to a
  multiple of the token patch (patch_size x spatial_merge_size, as PixtralProcessor passes it), and
  resized there with PIL bicubic on uint8; rescale in float64 cast to float32, normalize in float32.
  No square: the tower takes the image at its own aspect.
- A batch is zero-padded at the bottom and right to its largest height and width (HF's do_pad); the
  tower crops each image back to its own size (`image_sizes`).
- An image becomes rows of `[IMG]` tokens, each row ended by `[IMG_BREAK]`, the last by `[IMG_END]`: one
  token per (merged) patch. Only the `[IMG]` tokens take the image's embedding rows.
- Deliberate difference from HF, an ImageError: an image whose short side shrinks to no pixel at all
  (HF makes a zero-sized array and fails inside PIL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ....errors import ConfigError, ImageError
from ....processing.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_rgb


@dataclass(frozen=True)
class PixtralImageConfig:
    longest_edge: int = 1024             # HF size["longest_edge"]
    patch_size: int = 16                 # pixels per image token along a side: the ViT patch x spatial merge
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_hf(cls, d: dict, token_patch: int) -> "PixtralImageConfig":
        """preprocessor_config.json; token_patch: what PixtralProcessor passes as patch_size (patch x merge)."""
        size = d.get("size", {"longest_edge": cls.longest_edge})
        if isinstance(size, int):
            size = {"longest_edge": size}
        if not isinstance(size, dict):
            raise ConfigError(f"preprocessor_config.json size must be an object with longest_edge, got {size!r}")
        edge = size.get("longest_edge")
        if edge is None and size.get("height") and size.get("width"):
            if size["height"] != size["width"]:
                raise ConfigError(f"preprocessor_config.json size {size}: foveal reads a square bound only "
                                  f"(use longest_edge)")
            edge = size["height"]
        if not isinstance(edge, int) or isinstance(edge, bool) or edge < token_patch:
            raise ConfigError(f"preprocessor_config.json size.longest_edge must be an integer of at least "
                              f"{token_patch} px, got {edge!r}")
        mean = tuple(float(x) for x in d.get("image_mean", OPENAI_CLIP_MEAN))
        std = tuple(float(x) for x in d.get("image_std", OPENAI_CLIP_STD))
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ConfigError(f"preprocessor_config.json image_mean / image_std need 3 values each (std > 0), got "
                              f"{d.get('image_mean')!r} / {d.get('image_std')!r}")
        return cls(longest_edge=edge, patch_size=token_patch, image_mean=mean, image_std=std,
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)), do_resize=bool(d.get("do_resize", True)),
                   do_rescale=bool(d.get("do_rescale", True)), do_normalize=bool(d.get("do_normalize", True)),
                   resample=int(d.get("resample", Image.Resampling.BICUBIC)))


def resized_size(height: int, width: int, cfg: PixtralImageConfig) -> tuple[int, int]:
    """HF get_resize_output_image_size: (height, width) the image is resized to."""
    if not cfg.do_resize:
        return height, width
    ratio = max(height / cfg.longest_edge, width / cfg.longest_edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    if height < 1 or width < 1:
        raise ImageError(f"an image of {width}x{height} px after fitting it into {cfg.longest_edge} px has no area: "
                         f"its aspect ratio is too extreme; crop or pad it")
    p = cfg.patch_size
    return ((height - 1) // p + 1) * p, ((width - 1) // p + 1) * p


def token_grid(height: int, width: int, cfg: PixtralImageConfig) -> tuple[int, int]:
    """(rows, columns) of image tokens for an image of this size."""
    h, w = resized_size(height, width, cfg)
    return h // cfg.patch_size, w // cfg.patch_size


def image_text(rows: int, cols: int, image: str = "[IMG]", row_break: str = "[IMG_BREAK]",
               end: str = "[IMG_END]") -> str:
    """What one image placeholder becomes (PixtralProcessor.replace_image_token)."""
    return ((image * cols + row_break) * rows)[:-len(row_break)] + end


def process_image(image: Image.Image, cfg: PixtralImageConfig) -> torch.Tensor:
    """One PIL image -> (3, h, w) float32 at its resized size (before batch padding)."""
    rgb = to_rgb(image)
    height, width = resized_size(rgb.height, rgb.width, cfg)
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), resample=cfg.resample)
    pixels = np.asarray(rgb).transpose(2, 0, 1)      # (3, H, W) uint8
    if cfg.do_rescale:      # transformers.image_transforms.rescale: float64 product, cast to float32
        out = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        out = pixels.astype(np.float32)
    if cfg.do_normalize:
        mean = np.array(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.array(cfg.image_std, dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    return torch.from_numpy(np.ascontiguousarray(out))


def process_images(images: list, cfg: PixtralImageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values (N, 3, H_max, W_max) zero-padded, image_sizes (N, 2) long), as HF's batch."""
    if not images:
        raise ImageError("no images to process")
    done = [process_image(im, cfg) for im in images]
    sizes = torch.tensor([t.shape[1:] for t in done], dtype=torch.long)
    h, w = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    batch = torch.zeros(len(done), 3, h, w)
    for i, t in enumerate(done):
        batch[i, :, :t.shape[1], :t.shape[2]] = t
    return batch, sizes
