"""Examples (scene + image + captions + questions) and the world's text corpus.

Design decisions:
- `generate` is a lazy iterator: 100k examples never sit in memory at once, and an
  exporter writes each image as it comes.
- Example i depends only on (seed, start + i): a slice of a dataset can be regenerated, or
  generated in parallel workers, without producing the rest.
- The text corpus and the scene documents need no pixels, so they skip rendering.
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
from foveal.engine.thinking import with_thought


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


def scene_documents(n: int, seed: int = 0, config: WorldConfig | None = None, start: int = 0,
                    relation_thoughts: bool = False) -> Iterator[str]:
    """One document per scene for LM pretraining, its lines joined by newlines: the scene's captions, the
    caption prompt with its answer, then every question with its answer in a shuffled order.
    relation_thoughts: a relation question's answer opens with its thought, as in `llava_record`.

    Each question then sits in the context of the captions that answer it, so the LM learns to look an
    object up in its context (what stage 2 needs it to do among image tokens). Separate lines packed
    into blocks (`text_corpus`) cut a caption off from its questions, and a short LM stage on them does
    not learn the lookup (measured, README: "Thinking first, and what the LM cannot do")."""
    for ex in generate(n, seed, config, start, images=False):
        rng = stream_rng(seed, ex.scene.index, STREAM_EXPORT)
        pairs = list(dict.fromkeys(
            f"{q.question} {with_thought(q.answer, q.thought if relation_thoughts else None)}" for q in ex.questions))
        rng.shuffle(pairs)
        yield "\n".join([*ex.captions, f"{rng.choice(TEMPLATES['caption_prompt'])} {ex.captions[0]}", *pairs])
