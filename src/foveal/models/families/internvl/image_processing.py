"""InternVL's image preprocessing: transformers 5.25's GotOcr2ImageProcessorPil under InternVLProcessor.

An image becomes tiles of the tower's size: a grid of cols x rows tiles whose aspect is the closest
to the image's (at least `min_patches`, at most `max_patches` tiles), cut row-major from the image
resized to that grid, plus a thumbnail of the whole image when the grid has more than one tile.

Design decisions:
- InternVLProcessor always passes `crop_to_patches=True` to the image processor (its
  `images_kwargs`), which outranks the image processor's own (saved) setting: tiling is on unless
  `max_patches` is 1 (then one resized view, as HF does).
- The grid search is `get_optimal_tiled_canvas`, ties included: among grids with the same aspect
  difference the later one (more tiles) wins while the image's area is more than half the grid's.
- Resizes are PIL's on uint8 (bicubic by default), then rescale in float64 cast to float32 and
  normalize in float32, as the PIL backend does (processing.images' helper).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from ....errors import ConfigError
from ....processing.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _rescale_and_normalize, to_rgb

# GotOcr2ImageProcessorPil class defaults (size 384 is GOT-OCR's; InternVL checkpoints save 448)
DEFAULTS = dict(size={"height": 384, "width": 384}, min_patches=1, max_patches=12, resample=3, do_resize=True,
                do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP_MEAN,
                image_std=OPENAI_CLIP_STD)


@dataclass(frozen=True)
class TileConfig:
    tile: int                      # a tile's side in pixels (the image processor's size)
    min_patches: int
    max_patches: int
    resample: int                  # PIL resample id
    do_resize: bool                # read only without tiling (max_patches 1)
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_hf(cls, d: dict) -> TileConfig:
        v = DEFAULTS | {k: x for k, x in (d or {}).items() if x is not None and k in DEFAULTS}
        size = v["size"]
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if not isinstance(size, dict) or set(size) != {"height", "width"} or size["height"] != size["width"]:
            raise ConfigError(f"the image processor's size {size!r} must be a square {{'height': S, 'width': S}} "
                              f"(InternVL's tiles are the tower's square input)")
        for key in ("min_patches", "max_patches"):
            if not isinstance(v[key], int) or isinstance(v[key], bool) or v[key] < 1:
                raise ConfigError(f"the image processor's {key} must be a positive integer, got {v[key]!r}")
        if v["min_patches"] > v["max_patches"]:
            raise ConfigError(f"the image processor's min_patches {v['min_patches']} is above max_patches "
                              f"{v['max_patches']}")
        mean, std = (tuple(float(x) for x in v[k]) for k in ("image_mean", "image_std"))
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError("the image processor's image_mean and image_std need one value per RGB channel")
        return cls(int(size["height"]), v["min_patches"], v["max_patches"], int(v["resample"]), bool(v["do_resize"]),
                   bool(v["do_rescale"]), float(v["rescale_factor"]), bool(v["do_normalize"]), mean, std)

    @property
    def tiles_on(self) -> bool:
        return self.max_patches > 1


@lru_cache(maxsize=16)
def _arrangements(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """get_all_supported_aspect_ratios: (cols, rows) by tile count, stable within a count."""
    grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
             if min_tiles <= w * h <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])


def tile_grid(height: int, width: int, cfg: TileConfig) -> tuple[int, int]:
    """(cols, rows) of an image's tiles (get_optimal_tiled_canvas); (1, 1) without tiling."""
    if not cfg.tiles_on:
        return 1, 1
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for grid in _arrangements(cfg.min_patches, cfg.max_patches):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * cfg.tile * cfg.tile * grid[0] * grid[1]:
            best = grid
    return best


def tile_count(height: int, width: int, cfg: TileConfig) -> int:
    """Tower passes for one image: its tiles, plus the thumbnail when there is more than one."""
    cols, rows = tile_grid(height, width, cfg)
    return 1 if cols * rows == 1 else cols * rows + 1


def tiles(image: Image.Image, cfg: TileConfig) -> torch.Tensor:
    """One image -> (tiles [+ thumbnail], 3, S, S) float32, as the HF processor lays them out."""
    rgb = to_rgb(image)
    s = cfg.tile
    if not cfg.tiles_on:
        views = [rgb.resize((s, s), resample=cfg.resample) if cfg.do_resize else rgb]
    else:
        cols, rows = tile_grid(rgb.height, rgb.width, cfg)
        canvas = np.asarray(rgb.resize((s * cols, s * rows), resample=cfg.resample))   # (H, W, 3) uint8
        views = [canvas[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
        if len(views) > 1:
            views.append(rgb.resize((s, s), resample=cfg.resample))
    out = [_rescale_and_normalize(np.asarray(v), cfg).transpose(2, 0, 1) for v in views]
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))
