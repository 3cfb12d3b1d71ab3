"""The shapes world: a closed vocabulary, a config, and seeded scene sampling.

Design decisions:
- The world is small and closed so that a tiny ViT + LM can learn all of it: 6 shapes,
  8 named colours, 3 sizes, a 3x3 grid of named cells, 1-4 objects, and optional text of
  1-3 characters. Every word the world can say is listed by `world_words()`.
- One object per grid cell, drawn inside its cell: objects never overlap, so a count is
  always well-defined and "where is X" always has one canonical answer (the cell name).
- Text, when present, takes a whole grid row (a band), so it can be drawn big enough to
  read at 48-64 px; objects then use the other two rows.
- Shapes and colours are drawn with skewed (fixed) priors, not uniformly: POPE's "popular"
  negatives need some objects to be more frequent than others. `object_prior()` gives the
  exact frequency of each (colour, shape) pair, so nobody has to count a dataset.
- A seed gives the same scene content (objects, cells, text) at every image size; only
  pixel boxes scale. Positions jitter inside their cell so no object sits on a fixed pixel.
- Determinism: every scene draws from its own `random.Random`, seeded through
  `numpy.random.SeedSequence((seed, index, stream))`; the global RNG is never touched.
  Scenes, questions and export sampling use different streams, so changing the question
  types does not change the pictures.
- The text alphabet leaves out look-alike pairs (O/0, I/1, S/5, B/8, Z/2, G/6, D/0) so
  that reading is well-posed at low resolution.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from foveal.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SHAPE_PLURALS = {s: s + "es" if s.endswith("ss") else s + "s" for s in SHAPES}
# Relative frequencies; skewed on purpose (see module docstring).
SHAPE_WEIGHTS = (0.24, 0.22, 0.18, 0.14, 0.12, 0.10)

COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 180, 70),
    "cyan": (40, 210, 220),
    "blue": (40, 80, 230),
    "purple": (150, 60, 210),
    "pink": (250, 130, 200),
}
COLOR_WEIGHTS = (0.18, 0.11, 0.13, 0.15, 0.09, 0.16, 0.10, 0.08)

# Object side as a fraction of a grid cell's side. Gaps of 0.2 cell (>= 4 px at 64 px)
# keep the three sizes apart for a patch-8 encoder.
SIZES = {"small": 0.5, "medium": 0.7, "large": 0.9}

BACKGROUND = (24, 24, 24)
TEXT_COLOR = (255, 255, 255)  # not an object colour, so text never reads as a shape
TEXT_ALPHABET = "ACEFHJKLMNPRTUVXY234679"
GLYPH_W, GLYPH_H = 5, 7  # the block font's dots per character (render.FONT_5X7)

ROW_NAMES = ("top", "middle", "bottom")
# Cell names double as the answers to "where is the X?".
CELL_NAMES = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)

QUESTION_TYPES = ("count", "color", "shape", "position", "exist", "text", "describe")
POPE_CATEGORIES = ("random", "popular", "adversarial")

MIN_IMAGE_SIZE = 48  # below this a 3-row text band cannot hold 2x-scaled 5x7 glyphs
MAX_IMAGE_SIZE = 1024
GRID = 3


@dataclass(frozen=True)
class WorldConfig:
    """What the generator makes. Defaults are the bundled model's world."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    text_prob: float = 0.5  # share of scenes with a text band
    max_text_len: int = 3
    question_types: tuple[str, ...] = QUESTION_TYPES

    def __post_init__(self):
        if not isinstance(self.image_size, int) or not (
            MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE
        ):
            raise ConfigError(
                f"image_size must be an int from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} "
                f"(smaller images cannot show legible text and shapes); got {self.image_size!r}"
            )
        # With text, one row is taken: 6 cells remain.
        if not 1 <= self.min_objects <= self.max_objects <= 2 * GRID:
            raise ConfigError(
                f"need 1 <= min_objects <= max_objects <= {2 * GRID} "
                f"(one object per grid cell); got {self.min_objects}, {self.max_objects}"
            )
        if not 0.0 <= self.text_prob <= 1.0:
            raise ConfigError(f"text_prob must be within [0, 1]; got {self.text_prob!r}")
        if not 1 <= self.max_text_len <= 3:
            raise ConfigError(f"max_text_len must be 1, 2 or 3; got {self.max_text_len!r}")
        if isinstance(self.question_types, str):
            object.__setattr__(self, "question_types", (self.question_types,))
        unknown = [t for t in self.question_types if t not in QUESTION_TYPES]
        if unknown or not self.question_types:
            raise ConfigError(
                f"unknown question type(s) {unknown or '(none given)'}; "
                f"choose from {', '.join(QUESTION_TYPES)}"
            )
        object.__setattr__(self, "question_types", tuple(self.question_types))


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    row: int
    col: int
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), pixels, x1/y1 inclusive

    @property
    def cell(self) -> str:
        return CELL_NAMES[self.row][self.col]

    @property
    def kind(self) -> tuple[str, str]:
        """The POPE "object category": colour and shape together."""
        return (self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    seed: int
    index: int
    image_size: int
    objects: tuple[ShapeObject, ...]  # in reading order (row-major by cell)
    text: str | None = None
    text_row: int | None = None
    text_origin: tuple[int, int] | None = None  # top-left pixel of the first glyph
    text_scale: int = 0  # pixels per glyph dot

    @property
    def id(self) -> str:
        return f"{self.index:06d}"


def check_seed(seed: int, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"{what} must be a non-negative int; got {seed!r}")
    return int(seed)


def check_count(n: int, what: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"{what} must be a non-negative int; got {n!r}")
    return int(n)


def stream_rng(seed: int, index: int, stream: int) -> random.Random:
    """An RNG owned by one (seed, index, stream): independent of every other one."""
    state = np.random.SeedSequence((seed, index, stream)).generate_state(2, np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1]))


# Streams of one scene's randomness; new streams go at the end.
STREAM_SCENE, STREAM_QUESTIONS, STREAM_EXPORT = 0, 1, 2


def cell_box(image_size: int, row: int, col: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), end-exclusive; cells tile the image exactly."""
    edges = [round(i * image_size / GRID) for i in range(GRID + 1)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def glyph_scale(image_size: int) -> int:
    # 5x7 glyphs plus a dot of margin must fit a band of image_size / 3 rows.
    return max(1, (image_size // GRID) // 8)


def make_scene(seed: int, index: int, config: WorldConfig | None = None) -> Scene:
    """The scene number `index` of the world `seed`: same arguments, same scene."""
    config = config or WorldConfig()
    seed, index = check_seed(seed), check_seed(index, "index")
    rng = stream_rng(seed, index, STREAM_SCENE)
    size = config.image_size

    text = text_row = text_origin = None
    scale = 0
    if rng.random() < config.text_prob:
        length = rng.randint(1, config.max_text_len)
        text = "".join(rng.choice(TEXT_ALPHABET) for _ in range(length))
        text_row = rng.randrange(GRID)
        scale = glyph_scale(size)
        # One blank dot column between characters.
        width, height = ((GLYPH_W + 1) * length - 1) * scale, GLYPH_H * scale
        x0, y0, x1, y1 = cell_box(size, text_row, 0)[0], *cell_box(size, text_row, GRID - 1)[1:]
        # Jitter inside the band so the reader cannot rely on a fixed position. Jitter is
        # drawn as a fraction (one draw whatever the room), so that a seed gives the same
        # scene content at every image size.
        x = x0 + scale + round(rng.random() * max(0, (x1 - x0) - width - 2 * scale))
        y = y0 + ((y1 - y0) - height) // 2
        text_origin = (x, y)

    free = [(r, c) for r in range(GRID) for c in range(GRID) if r != text_row]
    count = rng.randint(config.min_objects, config.max_objects)
    cells = sorted(rng.sample(free, count))
    objects = []
    for row, col in cells:
        shape = rng.choices(SHAPES, SHAPE_WEIGHTS)[0]
        color = rng.choices(tuple(COLORS), COLOR_WEIGHTS)[0]
        size_name = rng.choice(tuple(SIZES))
        cx0, cy0, cx1, cy1 = cell_box(size, row, col)
        # Side from the nominal cell, not this cell: cells differ by a pixel when the
        # image size is not a multiple of 3, and a size must mean one pixel count.
        side = max(4, round(SIZES[size_name] * size / GRID))
        # Keep a 1 px margin to the cell edge so neighbours never touch.
        room_x = max(0, (cx1 - cx0) - side - 2)
        room_y = max(0, (cy1 - cy0) - side - 2)
        x = cx0 + 1 + round(rng.random() * room_x)
        y = cy0 + 1 + round(rng.random() * room_y)
        objects.append(ShapeObject(shape, color, size_name, row, col, (x, y, x + side - 1, y + side - 1)))
    return Scene(seed, index, size, tuple(objects), text, text_row, text_origin, scale)


def object_prior() -> dict[tuple[str, str], float]:
    """Probability that a drawn object is (colour, shape): what "popular" ranks by."""
    total_s, total_c = sum(SHAPE_WEIGHTS), sum(COLOR_WEIGHTS)
    return {
        (c, s): (cw / total_c) * (sw / total_s)
        for c, cw in zip(COLORS, COLOR_WEIGHTS)
        for s, sw in zip(SHAPES, SHAPE_WEIGHTS)
    }


def world_words() -> list[str]:
    """Every word and symbol the world's captions, questions and answers can use."""
    from foveal.data import language  # late: language imports this module

    words = set(language.TEMPLATE_WORDS)
    words.update(SHAPES, SHAPE_PLURALS.values(), COLORS, SIZES, ROW_NAMES)
    words.update(w for row in CELL_NAMES for name in row for w in name.split())
    words.update(TEXT_ALPHABET)
    words.update(str(i) for i in range(2 * GRID + 1))
    return sorted(words)
