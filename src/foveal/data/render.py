"""Drawing a Scene into pixels, and PNG bytes that are the same on every run.

Design decisions:
- Flat colours, no anti-aliasing: every pixel of an object has exactly its named RGB, so
  tests (and a tiny encoder) can tell colours apart without tolerance.
- Text uses a built-in 5x7 block font scaled by an integer factor, not a system or
  FreeType font: the glyphs are crisp at 64 px and identical on every machine and Pillow
  version. The alphabet (`world.TEXT_ALPHABET`) has no look-alike pairs.
- Glyph masks are built once per (character, scale) and pasted, which keeps rendering
  at tens of microseconds per scene.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

from PIL import Image, ImageDraw

from foveal.data.world import BACKGROUND, COLORS, GLYPH_H, GLYPH_W, TEXT_COLOR, Scene, ShapeObject

# 5x7 glyphs, one string of 7 rows per character; '#' is ink.
FONT_5X7 = {
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
}


@lru_cache(maxsize=None)
def glyph_mask(char: str, scale: int) -> Image.Image:
    """Mode-"1" mask of one character, each font dot a scale x scale block."""
    rows = FONT_5X7[char].split("|")
    mask = Image.new("1", (GLYPH_W, GLYPH_H), 0)
    mask.putdata([1 if ch == "#" else 0 for row in rows for ch in row])
    return mask.resize((GLYPH_W * scale, GLYPH_H * scale), Image.NEAREST)


def text_boxes(scene: Scene) -> list[tuple[int, int, int, int]]:
    """Pixel box (x0, y0, x1, y1), end-exclusive, of each rendered character."""
    if not scene.text:
        return []
    x, y = scene.text_origin
    s = scene.text_scale
    step = (GLYPH_W + 1) * s  # one dot of space between characters
    return [(x + i * step, y, x + i * step + GLYPH_W * s, y + GLYPH_H * s) for i in range(len(scene.text))]


# Five-pointed star on the unit circle, point up; inner radius 0.45 keeps the arms thick
# enough to survive a 10 px drawing.
UNIT_STAR = tuple(
    ((1.0 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
     (1.0 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5))
    for i in range(10)
)


def draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    x0, y0, x1, y1 = obj.bbox
    fill = COLORS[obj.color]
    side = x1 - x0  # inclusive box: pixel span is side + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        # A square the full box would look larger than a circle of the same box.
        inset = round(side * 0.08)
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif obj.shape == "star":
        r = side / 2
        draw.polygon([(round(cx + r * u), round(cy + 0.08 * side + r * v)) for u, v in UNIT_STAR], fill=fill)
    elif obj.shape == "cross":
        arm = max(1, round(side / 3))  # arm thickness: a third of the box
        a0 = round(cx - arm / 2)
        draw.rectangle((a0, y0, a0 + arm, y1), fill=fill)
        b0 = round(cy - arm / 2)
        draw.rectangle((x0, b0, x1, b0 + arm), fill=fill)
    else:  # pragma: no cover - make_scene only draws known shapes
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of scene.image_size x scene.image_size pixels."""
    img = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_object(draw, obj)
    for char, (x0, y0, _, _) in zip(scene.text or "", text_boxes(scene)):
        img.paste(TEXT_COLOR, (x0, y0), glyph_mask(char, scene.text_scale))
    return img


def png_bytes(img: Image.Image) -> bytes:
    """PNG with no metadata and fixed settings, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
