"""Examples (scene + image + captions + questions) and the world's text corpus.

Design decisions:
- `generate` is a lazy iterator: 100k examples never sit in memory at once, and an
  exporter writes each image as it comes.
- Example i depends only on (seed, start + i): a slice of a dataset can be regenerated, or
  generated in parallel workers, without producing the rest.
- The text corpus needs no pixels, so it skips rendering.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from foveal.data.language import TEMPLATES, Question, captions, make_questions
from foveal.data.render import render
from foveal.data.world import (
    STREAM_EXPORT,
    Scene,
    WorldConfig,
    check_count,
    check_seed,
    make_scene,
    stream_rng,
)


@dataclass
class Example:
    scene: Scene
    image: Image.Image | None
    captions: list[str]
    questions: list[Question]

    @property
    def id(self) -> str:
        return self.scene.id


def generate(
    n: int,
    seed: int = 0,
    config: WorldConfig | None = None,
    start: int = 0,
    images: bool = True,
) -> Iterator[Example]:
    """Examples start .. start+n-1 of world `seed`; `images=False` skips rendering."""
    config = config or WorldConfig()
    n, seed, start = check_count(n), check_seed(seed), check_seed(start, "start")
    for index in range(start, start + n):
        scene = make_scene(seed, index, config)
        yield Example(scene, render(scene) if images else None, captions(scene), make_questions(scene, config))


def text_corpus(n: int, seed: int = 0, config: WorldConfig | None = None, start: int = 0) -> Iterator[str]:
    """Sentences of the world for LM pretraining: per scene, its captions and each
    question followed by its answer ("How many red shapes are there? 2")."""
    for ex in generate(n, seed, config, start, images=False):
        rng = stream_rng(seed, ex.scene.index, STREAM_EXPORT)
        yield from ex.captions
        yield f"{rng.choice(TEMPLATES['caption_prompt'])} {ex.captions[0]}"
        for q in ex.questions:
            yield f"{q.question} {q.answer}"
