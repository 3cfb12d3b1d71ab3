"""LLaVA-NeXT ("anyres", LLaVA-1.6) image tiling: the geometry shared by preprocessing and the model.

Design decisions (after transformers' LlavaNextImageProcessor and LlavaNextModel.pack_image_features,
themselves ported from LLaVA-1.6's `process_anyres_image` / `unpad_image`):
- Pinpoints are (height, width) pairs, as in HF's config.json. The best one keeps the most of the
  image's pixels after an aspect-preserving downscale, then wastes the fewest.
- The image is resized into the best resolution keeping its aspect (the short side rounded up, capped
  at the target), pasted centred on black, and cut into tower-sized tiles, row-major. A base view is
  the whole image squashed to one tile (aspect not kept). Each view then takes the ordinary CLIP
  preprocessing (resize by the shortest edge: a no-op on a full tile, centre crop, normalize).
- Features: the base view's rows; then the tiles' patch grids stitched into one grid, the rows or
  columns that only saw padding removed ("unpad"), and an `image_newline` vector after each row.
- The number of image tokens depends on the image's size. `layout(size, ...).tokens` gives it from the
  size alone, before any pixel is encoded, so the prompt can be built; `AnyresLayout` is what both
  sides read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from foveal.errors import ConfigError

LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))   # LlavaNextConfig's default
MAX_PINPOINTS = 64
MAX_TILES = 64


def check_pinpoints(value, tile: int | None = None) -> tuple[tuple[int, int], ...]:
    """Validate image_grid_pinpoints ([[H, W], ...]); a ConfigError names what is wrong."""
    if not isinstance(value, (list, tuple)) or not value or len(value) > MAX_PINPOINTS:
        raise ConfigError(f"image_grid_pinpoints must be a list of 1-{MAX_PINPOINTS} [height, width] pairs, "
                          f"got {value!r}")
    out = []
    for p in value:
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 1 << 15 for x in p)):
            raise ConfigError(f"image_grid_pinpoints entry {p!r} is not a [height, width] pair of positive integers")
        if tile is not None and (p[0] % tile or p[1] % tile or (p[0] // tile) * (p[1] // tile) > MAX_TILES):
            raise ConfigError(f"image_grid_pinpoints entry {list(p)} is not a grid of at most {MAX_TILES} "
                              f"{tile}-px tiles")
        out.append((int(p[0]), int(p[1])))
    return tuple(out)


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """(height, width) of the image -> the pinpoint (height, width) it is tiled at."""
    height, width = size
    best, best_effective, best_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    return best


def fitted_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The image's (height, width) after an aspect-preserving resize into target (HF get_patch_output_size)."""
    height, width = size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@dataclass(frozen=True)
class AnyresLayout:
    """Where one image's tokens come from."""
    best: tuple[int, int]           # (H, W) the image is tiled at
    tiles: tuple[int, int]          # (rows, cols) of tower-sized tiles
    grid: int                       # patches per tile side
    keep_rows: tuple[int, int]      # the stitched patch grid's rows [a, b) and columns [a, b) that saw the image
    keep_cols: tuple[int, int]
    base_tokens: int                # the base view's tokens

    @property
    def unpadded(self) -> tuple[int, int]:
        return self.keep_rows[1] - self.keep_rows[0], self.keep_cols[1] - self.keep_cols[0]

    @property
    def tokens(self) -> int:
        rows, cols = self.unpadded
        return self.base_tokens + rows * (cols + 1)         # one image_newline per row


def layout(size: tuple[int, int], pinpoints, tile: int, patch: int, base_tokens: int) -> AnyresLayout:
    """The layout of an image of (height, width) `size` (HF's unpad_image arithmetic, to the row)."""
    height, width = size
    if height < 1 or width < 1:
        raise ConfigError(f"image size {size} has no pixels")
    best = select_best_resolution(size, pinpoints)
    rows, cols = best[0] // tile, best[1] // tile
    grid = tile // patch
    cur_h, cur_w = rows * grid, cols * grid
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        keep_rows, keep_cols = (pad, cur_h - pad), (0, cur_w)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        pad = (cur_w - new_w) // 2
        keep_rows, keep_cols = (0, cur_h), (pad, cur_w - pad)
    return AnyresLayout(best, (rows, cols), grid, keep_rows, keep_cols, base_tokens)


def tile_views(rgb: Image.Image, pinpoints, tile: int, base: int, resample: int) -> list[Image.Image]:
    """The base view (base x base) and the tile x tile tiles of one RGB image, before the per-view CLIP
    preprocessing."""
    size = (rgb.height, rgb.width)
    best = select_best_resolution(size, pinpoints)
    new_h, new_w = fitted_size(size, best)
    canvas = np.zeros((best[0], best[1], 3), dtype=np.uint8)         # padding is black, as in HF
    top, left = (best[0] - new_h) // 2, (best[1] - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = np.asarray(rgb.resize((new_w, new_h), resample=resample))
    views = [rgb.resize((base, base), resample=resample)]
    for y in range(0, best[0], tile):
        for x in range(0, best[1], tile):
            views.append(Image.fromarray(np.ascontiguousarray(canvas[y:y + tile, x:x + tile])))
    return views


def stitch(features: torch.Tensor, lay: AnyresLayout) -> torch.Tensor:
    """Projected features of [base, tiles...] (1 + rows*cols, grid*grid, D) -> the tiles' patch grids stitched
    into one, the rows or columns that only saw padding removed: (rows', cols', D)."""
    rows, cols = lay.tiles
    g, d = lay.grid, features.shape[-1]
    if features.shape[0] != 1 + rows * cols or features.shape[1] != g * g:
        raise ConfigError(f"anyres features {tuple(features.shape)} do not match {rows}x{cols} tiles of "
                          f"{g}x{g} patches (a vision tower without a square patch grid cannot tile)")
    x = features[1:].view(rows, cols, g, g, d).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
    return x[lay.keep_rows[0]:lay.keep_rows[1], lay.keep_cols[0]:lay.keep_cols[1]]


def with_newlines(base: torch.Tensor, grid: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """The base view's rows (P, D), then the grid's (rows, cols, D) row by row, a newline vector after each."""
    d = grid.shape[-1]
    nl = newline.to(grid.dtype).expand(grid.shape[0], 1, d)
    return torch.cat([base, torch.cat([grid, nl], dim=1).reshape(-1, d)])


def pack(features: torch.Tensor, lay: AnyresLayout, newline: torch.Tensor) -> torch.Tensor:
    """Projected features of [base, tiles...] (1 + rows*cols, grid*grid, D) -> the image's token rows (T, D)."""
    return with_newlines(features[0], stitch(features, lay), newline)
