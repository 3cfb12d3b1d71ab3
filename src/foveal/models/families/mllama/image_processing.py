"""Mllama's image processor: an image resized onto the best canvas of up to `max_image_tiles` tiles, padded,
normalized and cut into tiles.

Mirrors transformers 5.25's image_processing_pil_mllama.py (MllamaImageProcessorPil, the class
AutoImageProcessor picks without torchvision): get_all_supported_aspect_ratios, get_optimal_tiled_canvas,
get_image_size_fit_to_canvas, resize (PIL, BILINEAR by default), zero padding to the canvas, rescale in
float64 then normalize in float32, split_to_tiles, pack_images, aspect-ratio ids and mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from ....errors import ConfigError
from ....processing.images import to_rgb

IMAGENET_STANDARD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class MllamaImageConfig:
    tile_size: int = 224                 # MllamaImageProcessorPil's class defaults
    max_image_tiles: int = 4
    resample: int = 2                    # PIL BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = IMAGENET_STANDARD
    image_std: tuple = IMAGENET_STANDARD
    do_convert_rgb: bool = True

    @classmethod
    def from_hf(cls, d: dict) -> "MllamaImageConfig":
        size = d.get("size") or {"height": cls.tile_size, "width": cls.tile_size}
        if not isinstance(size, dict) or not size.get("height") or size.get("height") != size.get("width"):
            raise ConfigError(f"preprocessor_config.json size must be a square {{'height': S, 'width': S}} tile, "
                              f"got {size!r}")
        for key in ("do_resize", "do_pad"):
            if d.get(key) is False:
                raise ConfigError(f"preprocessor_config.json {key}=false is not supported by Mllama's image "
                                  f"processor (it always resizes onto a tiled canvas and pads)")
        tiles = d.get("max_image_tiles", cls.max_image_tiles)
        if not isinstance(tiles, int) or isinstance(tiles, bool) or tiles <= 0:
            raise ConfigError(f"preprocessor_config.json max_image_tiles must be a positive integer, got {tiles!r}")
        mean, std = d.get("image_mean", IMAGENET_STANDARD), d.get("image_std", IMAGENET_STANDARD)
        return cls(tile_size=int(size["height"]), max_image_tiles=tiles, resample=int(d.get("resample", 2)),
                   do_rescale=d.get("do_rescale", True), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                   do_normalize=d.get("do_normalize", True),
                   image_mean=tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3,
                   image_std=tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3,
                   do_convert_rgb=d.get("do_convert_rgb", True))


@lru_cache(maxsize=10)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    return tuple((w, h) for w in range(1, max_image_tiles + 1) for h in range(1, max_image_tiles + 1)
                 if w * h <= max_image_tiles)


@lru_cache(maxsize=100)
def optimal_canvas(height: int, width: int, max_image_tiles: int, tile: int) -> tuple[int, int]:
    """HF's get_optimal_tiled_canvas: the smallest upscale >= 1 if any, else the largest downscale; ties by area."""
    canvases = np.array(supported_aspect_ratios(max_image_tiles)) * tile
    th, tw = canvases.T
    scale_h, scale_w = th / height, tw / width
    scales = np.where(scale_w > scale_h, scale_h, scale_w)
    up = scales[scales >= 1]
    chosen = canvases[scales == (np.min(up) if len(up) else np.max(scales[scales < 1]))]
    if len(chosen) > 1:
        chosen = chosen[[np.argmin(chosen[:, 0] * chosen[:, 1])]]
    return int(chosen[0][0]), int(chosen[0][1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """HF's get_image_size_fit_to_canvas."""
    target_w = int(np.clip(width, tile, canvas_w))
    target_h = int(np.clip(height, tile, canvas_h))
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def tile_layout(height: int, width: int, cfg: MllamaImageConfig) -> tuple[int, int]:
    """(tiles down, tiles across) of an image of this size."""
    ch, cw = optimal_canvas(height, width, cfg.max_image_tiles, cfg.tile_size)
    return ch // cfg.tile_size, cw // cfg.tile_size


@dataclass
class MllamaImage:
    """One image made into pixels: tiles (max_image_tiles, 3, S, S), zeros past its own count."""
    pixel_values: torch.Tensor
    aspect_ratio_id: int                 # 1 + its (tiles down, tiles across) index in supported_aspect_ratios
    num_tiles: int

    @property
    def aspect_ratio_mask(self) -> torch.Tensor:
        m = torch.zeros(self.pixel_values.shape[0], dtype=torch.long)
        m[:max(self.num_tiles, 1)] = 1
        return m


def process_image(image: Image.Image, cfg: MllamaImageConfig) -> MllamaImage:
    rgb = to_rgb(image) if cfg.do_convert_rgb else image
    tiles_h, tiles_w = tile_layout(rgb.height, rgb.width, cfg)
    S = cfg.tile_size
    new_h, new_w = fit_to_canvas(rgb.height, rgb.width, tiles_h * S, tiles_w * S, S)
    pixels = np.asarray(rgb.resize((new_w, new_h), resample=cfg.resample))            # (h, w, 3) uint8
    canvas = np.zeros((tiles_h * S, tiles_w * S, 3), dtype=pixels.dtype)
    canvas[:new_h, :new_w] = pixels                                                     # zeros right / below
    out = canvas.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else canvas
    out = out.astype(np.float32)
    if cfg.do_normalize:
        out = (out - np.array(cfg.image_mean, dtype=np.float32)) / np.array(cfg.image_std, dtype=np.float32)
    chw = out.transpose(2, 0, 1)                                                        # (3, H, W)
    tiles = chw.reshape(3, tiles_h, S, tiles_w, S).transpose(1, 3, 0, 2, 4).reshape(tiles_h * tiles_w, 3, S, S)
    packed = torch.zeros((cfg.max_image_tiles, 3, S, S), dtype=torch.float32)
    packed[:tiles_h * tiles_w] = torch.from_numpy(np.ascontiguousarray(tiles))
    ratio_id = supported_aspect_ratios(cfg.max_image_tiles).index((tiles_h, tiles_w)) + 1
    return MllamaImage(packed, ratio_id, tiles_h * tiles_w)
