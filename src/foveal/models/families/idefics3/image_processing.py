"""Idefics3 / SmolVLM image processing: the longest-edge resize, the split into square tiles plus a global
view, and the tokens each image writes into the prompt.

Mirrors transformers 5.25's `Idefics3ImageProcessorPil` / `SmolVLMImageProcessorPil` (the two are the
same code) and the image half of `Idefics3Processor` / `SmolVLMProcessor` (`replace_image_token`).

Design decisions:
- Sizes are computed from the image's (height, width) alone, so a prompt's token count is known before
  any pixel is resized; `process_image` then follows the same sizes on the pixels.
- HF's order and dtypes: PIL resizes on uint8 (longest edge to `size`, then up to multiples of the tile,
  then each tile cropped and the global view resized to one tile), then rescale in float64 cast to
  float32 and normalize in float32 (processing.images' helper).
- Every frame HF makes for one prompt is one tile square (the vision-encoder resize rounds both sides up
  to tiles), so HF's padding to the batch's largest frame never pads here and pixel_attention_mask is
  all ones; the mask is still made and handed to the tower, which honours it.
- `size` may be {"longest_edge": N} or {"height": H, "width": W}; `max_image_size` is the tile side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ....errors import ConfigError
from ....processing.images import _rescale_and_normalize

MAX_IMAGE_SIZE = 4096       # HF: "4k resolution as absolute maximum"
IMAGENET_STANDARD = (0.5, 0.5, 0.5)
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"


@dataclass(frozen=True)
class Idefics3ImageConfig:
    """preprocessor_config.json, with Idefics3ImageProcessorPil's class defaults for absent keys."""
    tile: int = 364                         # max_image_size.longest_edge: the side of a tile and the global view
    longest_edge: int | None = 4 * 364      # size.longest_edge (None: size gives height and width)
    height: int | None = None               # size.height / size.width
    width: int | None = None
    do_resize: bool = True
    do_image_splitting: bool = True
    resample: int = Image.Resampling.LANCZOS
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = IMAGENET_STANDARD
    image_std: tuple = IMAGENET_STANDARD

    @classmethod
    def from_hf(cls, d: dict | None) -> "Idefics3ImageConfig":
        d = {k: v for k, v in (d or {}).items() if v is not None}
        fields = {}
        if "max_image_size" in d:
            tile = d["max_image_size"].get("longest_edge") if isinstance(d["max_image_size"], dict) else None
            fields["tile"] = _positive(tile, "max_image_size.longest_edge")
        if "size" in d:
            size = d["size"] if isinstance(d["size"], dict) else {}
            if size.get("longest_edge") is not None:
                fields["longest_edge"] = _positive(size["longest_edge"], "size.longest_edge")
            elif size.get("height") is not None and size.get("width") is not None:
                fields.update(longest_edge=None, height=_positive(size["height"], "size.height"),
                              width=_positive(size["width"], "size.width"))
            else:
                raise ConfigError(f"preprocessor_config.json: size {d['size']!r} needs longest_edge, or height and "
                                  f"width (as Idefics3ImageProcessor reads it)")
        for key in ("do_resize", "do_image_splitting", "do_rescale", "do_normalize"):
            if key in d:
                fields[key] = bool(d[key])
        if "resample" in d:
            fields["resample"] = int(d["resample"])
        if "rescale_factor" in d:
            fields["rescale_factor"] = float(d["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if key in d:
                v = d[key]
                v = [v] * 3 if isinstance(v, (int, float)) else list(v)
                if len(v) != 3:
                    raise ConfigError(f"preprocessor_config.json: {key} needs one value per RGB channel, got {d[key]!r}")
                fields[key] = tuple(float(x) for x in v)
        if d.get("do_pad") is False:
            raise ConfigError("preprocessor_config.json: do_pad=false is not supported for Idefics3 / SmolVLM "
                              "(transformers pads every image's frames into one tensor); set do_pad to true")
        return cls(**fields)


def _positive(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"preprocessor_config.json: {key} must be a positive integer, got {value!r}")
    return value


# ---- sizes (HF: _resize_output_size_rescale_to_max_len, _resize_output_size_scale_below_upper_bound,
#      resize_for_vision_encoder, split_images) ----------------------------------------------------
def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        if height % 2 != 0:
            height += 1
    else:
        height = max_len
        width = int(height * aspect_ratio)
        if width % 2 != 0:
            width += 1
    return max(height, 1), max(width, 1)


def _scale_below_upper_bound(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def resized_size(height: int, width: int, cfg: Idefics3ImageConfig) -> tuple[int, int]:
    """(height, width) after the first resize (do_resize)."""
    if not cfg.do_resize:
        return height, width
    if cfg.longest_edge is None:
        return cfg.height, cfg.width
    height, width = _rescale_to_max_len(height, width, cfg.longest_edge)
    return _scale_below_upper_bound(height, width, MAX_IMAGE_SIZE)


def tiled_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) rounded up to whole tiles, as resize_for_vision_encoder computes it."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


def grid(height: int, width: int, cfg: Idefics3ImageConfig) -> tuple[int, int]:
    """(rows, cols) of tiles an image is split into; (0, 0): the global view alone."""
    if not cfg.do_image_splitting:
        return 0, 0
    h, w = tiled_size(*resized_size(height, width, cfg), cfg.tile)
    if h > cfg.tile or w > cfg.tile:
        return (h - cfg.tile) // cfg.tile + 1, (w - cfg.tile) // cfg.tile + 1
    return 0, 0


def frame_count(height: int, width: int, cfg: Idefics3ImageConfig) -> int:
    rows, cols = grid(height, width, cfg)
    return rows * cols + 1 if rows or cols else 1


def image_text(rows: int, cols: int, seq_len: int, image_token: str, fake_token: str = FAKE_TOKEN,
               global_token: str = GLOBAL_TOKEN) -> str:
    """What one image's placeholder becomes (HF's replace_image_token / get_image_prompt_string)."""
    image = image_token * seq_len
    whole = f"{fake_token}{global_token}{image}{fake_token}"
    if rows == 0 and cols == 0:
        return whole
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"{fake_token}<row_{r + 1}_col_{c + 1}>{image}"
        text += "\n"
    return text + "\n" + whole


# ---- pixels ------------------------------------------------------------------------------------
def process_image(image: Image.Image, cfg: Idefics3ImageConfig) -> torch.Tensor:
    """One RGB image -> its frames (n, 3, tile, tile) float32: the tiles row-major, then the global view."""
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    height, width = resized_size(rgb.height, rgb.width, cfg)
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), resample=cfg.resample)
    tile = cfg.tile
    if cfg.do_image_splitting:
        height, width = tiled_size(height, width, tile)
        if (height, width) != (rgb.height, rgb.width):
            rgb = rgb.resize((width, height), resample=cfg.resample)
        frames = [np.asarray(rgb)]
        if height > tile or width > tile:
            pixels = frames[0]
            rows, cols = (height - tile) // tile + 1, (width - tile) // tile + 1
            frames = [pixels[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows)
                      for c in range(cols)]
            frames.append(np.asarray(rgb.resize((tile, tile), resample=cfg.resample)))
    else:
        frames = [np.asarray(rgb.resize((tile, tile), resample=cfg.resample))]
    out = [_rescale_and_normalize(f, cfg).transpose(2, 0, 1) for f in frames]    # (3, h, w) each
    shapes = {f.shape for f in out}
    if len(shapes) > 1:     # HF pads frames to the largest; with tiles every frame is one tile square
        raise ConfigError(f"this image processor config makes frames of different sizes {sorted(shapes)}")
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))
