"""Captions and questions about a Scene, each answer recomputable from the Scene alone.

Design decisions:
- Every answer is one canonical string: a digit, "yes"/"no", a colour, a shape, a cell
  name ("top left"), the rendered text as written ("A7"), or the canonical caption for
  "describe". Exact match is then a meaningful metric.
- An object is only asked about through a referring expression that picks out exactly
  one object ("the circle", else "the large circle", ...); ambiguous questions are never
  generated, so no answer depends on a guess.
- Yes/no questions choose the answer first (50/50) and then a question with that answer,
  so a model cannot score by always saying "yes". POPE-style existence questions come in
  yes/no pairs per negative-sampling category: the yes-ratio is exactly 0.5 per category.
- POPE categories: "random" (absent colour+shape drawn uniformly), "popular" (among the
  most frequent absent ones under `object_prior()`), "adversarial" (absent, but sharing the
  colour or the shape of a present object: the near miss a model hallucinates most).
- A few paraphrases per question type teach the LM that wording varies; the answer never
  depends on the paraphrase.
- Questions draw from their own RNG stream of (seed, index): the same scene always gets the
  same questions, and the picture does not change when question options do.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from foveal.data.world import (
    COLORS,
    POPE_CATEGORIES,
    QUESTION_TYPES,
    ROW_NAMES,
    SHAPE_PLURALS,
    SHAPES,
    STREAM_QUESTIONS,
    Scene,
    ShapeObject,
    WorldConfig,
    object_prior,
    stream_rng,
)

LOCATION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
TEXT_ROW_PHRASES = {"top": "at the top", "middle": "in the middle", "bottom": "at the bottom"}

TEMPLATES = {
    "count_all": ("How many shapes are there?", "How many objects are in the image?"),
    "count_filtered": ("How many {what} are there?", "How many {what} are in the image?"),
    "color": ("What color is the {ref}?", "What is the color of the {ref}?"),
    "shape": ("What shape is the {ref}?", "What is the shape of the {ref}?"),
    "where": ("Where is the {ref}?", "In which part of the image is the {ref}?"),
    "left": ("Is the {a} left of the {b}?", "Is the {a} to the left of the {b}?"),
    "right": ("Is the {a} right of the {b}?", "Is the {a} to the right of the {b}?"),
    "above": ("Is the {a} above the {b}?",),
    "below": ("Is the {a} below the {b}?",),
    "exist": ("Is there {a} {color} {shape} in the image?",),  # POPE's own wording
    "read": ("What does the text say?", "What is written in the image?", "Read the text in the image."),
    "has_text": ("Is there any text in the image?",),
    "describe": ("Describe the image.", "What is in the image?", "Describe the scene."),
    "caption_prompt": ("Describe the image briefly.", "What do you see?", "Give a short caption."),
}
CAPTION_WORDS = "a an and the text with shape shapes object image of yes no in at on".split()
TEMPLATE_WORDS = sorted(
    {w for ts in TEMPLATES.values() for t in ts for w in re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", "", t))}
    | {w for p in (*LOCATION_PHRASES.values(), *TEXT_ROW_PHRASES.values()) for w in p.split()}
    | set(CAPTION_WORDS)
)

POPULAR_TOP_K = 6  # "popular" negatives come from this many most frequent absent objects
_PRIOR = object_prior()
_KINDS_BY_POPULARITY = sorted(_PRIOR, key=lambda k: (-_PRIOR[k], k))


@dataclass(frozen=True)
class Question:
    type: str  # one of world.QUESTION_TYPES
    question: str
    answer: str
    # exist: the POPE category; position: "where" / "relation"; count: "all", "color",
    # "shape" or "color+shape"; text: "has_text" / "read"; color, shape, describe: None.
    category: str | None = None
    # The steps to the answer, for exports that let a model think first (relations only: where each
    # of the two objects is, which decides the answer). None: the answer needs no steps.
    thought: str | None = None

    @property
    def answer_type(self) -> str:
        """VQAv2's answer_type: "yes/no", "number" or "other"."""
        if self.answer in ("yes", "no"):
            return "yes/no"
        return "number" if self.answer.isdigit() else "other"


def article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def join_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def object_phrase(obj: ShapeObject, attrs: tuple[str, ...] = ("size", "color", "shape")) -> str:
    words = [getattr(obj, a) for a in ("size", "color", "shape") if a in attrs]
    return " ".join(words if "shape" in attrs else words + ["object"])


def unique_reference(obj: ShapeObject, scene: Scene, options: tuple[tuple[str, ...], ...]) -> str | None:
    """The first description in `options` that matches `obj` and no other object."""
    for attrs in options:
        matches = sum(all(getattr(o, a) == getattr(obj, a) for a in attrs) for o in scene.objects)
        if matches == 1:
            return object_phrase(obj, attrs)
    return None


# Which attributes may name an object for each question; never the one being asked.
REF_FOR_COLOR = (("shape",), ("size", "shape"))
REF_FOR_SHAPE = (("color",), ("size", "color"))
REF_FOR_POSITION = (("shape",), ("color", "shape"), ("size", "color", "shape"))


# -- captions ---------------------------------------------------------------------------

def canonical_caption(scene: Scene) -> str:
    """The one description a "describe" question must produce: objects in reading order."""
    items = [f"{article(p)} {p} {LOCATION_PHRASES[o.cell]}" for o in scene.objects for p in [object_phrase(o)]]
    if scene.text:
        items.append(f"the text {scene.text} {TEXT_ROW_PHRASES[ROW_NAMES[scene.text_row]]}")
    return join_words(items)


def captions(scene: Scene) -> list[str]:
    """A few caption styles of the scene; the first is the canonical one."""
    n = len(scene.objects)
    listed = join_words([f"{article(p)} {p}" for o in scene.objects for p in [object_phrase(o)]])
    counted = f"{n} {'shape' if n == 1 else 'shapes'}: {listed}"
    short = [f"{article(p)} {p}" for o in scene.objects for p in [object_phrase(o, ('color', 'shape'))]]
    if scene.text:
        counted += f", with the text {scene.text}"
        short.append(f"the text {scene.text}")
    return [canonical_caption(scene), counted, "an image of " + join_words(short)]


# -- questions, one function per type ---------------------------------------------------

def _count(scene: Scene, rng: random.Random) -> list[Question]:
    n = len(scene.objects)
    out = [Question("count", rng.choice(TEMPLATES["count_all"]), str(n), "all")]
    kind = rng.choice(("color", "shape", "color shape"))
    # Mostly ask about something present (answers 1..4); sometimes about anything (often 0).
    src = rng.choice(scene.objects) if rng.random() < 0.8 else None
    color = src.color if src else rng.choice(tuple(COLORS))
    shape = src.shape if src else rng.choice(SHAPES)
    if kind == "color":
        what, match = f"{color} shapes", lambda o: o.color == color
    elif kind == "shape":
        what, match = SHAPE_PLURALS[shape], lambda o: o.shape == shape
    else:
        what, match = f"{color} {SHAPE_PLURALS[shape]}", lambda o: o.kind == (color, shape)
    text = rng.choice(TEMPLATES["count_filtered"]).format(what=what)
    out.append(Question("count", text, str(sum(map(match, scene.objects))), kind.replace(" ", "+")))
    return out


def _attribute(scene: Scene, rng: random.Random, qtype: str, options, limit: int = 2) -> list[Question]:
    refs = [(o, r) for o in scene.objects for r in [unique_reference(o, scene, options)] if r]
    picked = rng.sample(refs, min(limit, len(refs)))
    return [Question(qtype, rng.choice(TEMPLATES[qtype]).format(ref=r), getattr(o, qtype)) for o, r in picked]


def _color(scene: Scene, rng: random.Random) -> list[Question]:
    return _attribute(scene, rng, "color", REF_FOR_COLOR)


def _shape(scene: Scene, rng: random.Random) -> list[Question]:
    return _attribute(scene, rng, "shape", REF_FOR_SHAPE)


RELATIONS = {
    "left": lambda a, b: a.col < b.col,
    "right": lambda a, b: a.col > b.col,
    "above": lambda a, b: a.row < b.row,
    "below": lambda a, b: a.row > b.row,
}


def relation_thought(rel: str, a: ShapeObject, ref_a: str, b: ShapeObject, ref_b: str) -> str:
    """Where the two objects of a relation question are, each in the captions' words and then as the
    number of its column (left / right) or row (above / below), counted from 1 at the left or top, then
    the one comparison that decides the answer, always asked one way round: "the circle is at the top
    left, column 1, and the square is on the right, column 3; is 1 less than 3?" ("Is the circle left
    of the square?": yes). For right and below the two numbers swap places in that last question.

    Each step reads only what the step before it wrote. With cells alone, a text LM that had learnt the
    lookups answered at chance; with the two numbers and the relation's word at the end ("so 1 left of
    3"), it learnt slowly (72 % after 924 steps), since left / right and above / below are mirror images
    and no single word says yes or no; with "is x less than y?" it answered 92 % after one pass of 231
    steps (README, "Relations: one comparison, one way round")."""
    axis = "column" if rel in ("left", "right") else "row"
    na, nb = getattr(a, axis[:3]) + 1, getattr(b, axis[:3]) + 1
    x, y = (na, nb) if rel in ("left", "above") else (nb, na)
    places = ", and ".join(f"the {ref} is {LOCATION_PHRASES[o.cell]}, {axis} {number}"
                           for o, ref, number in ((a, ref_a, na), (b, ref_b, nb)))
    return f"{places}; is {x} less than {y}?"


def _position(scene: Scene, rng: random.Random) -> list[Question]:
    refs = [(o, r) for o in scene.objects for r in [unique_reference(o, scene, REF_FOR_POSITION)] if r]
    if not refs:
        return []
    triples = [(rel, a, b) for a in refs for b in refs if a[0] is not b[0] for rel in RELATIONS]
    n_where = 1 if triples else min(2, len(refs))
    out = [
        Question("position", rng.choice(TEMPLATES["where"]).format(ref=r), o.cell, "where")
        for o, r in rng.sample(refs, n_where)
    ]
    if triples:
        want = rng.random() < 0.5
        pool = [t for t in triples if RELATIONS[t[0]](t[1][0], t[2][0]) == want] or triples
        rel, (a, ra), (b, rb) = rng.choice(pool)
        answer = "yes" if RELATIONS[rel](a, b) else "no"
        out.append(Question("position", rng.choice(TEMPLATES[rel]).format(a=ra, b=rb), answer, "relation",
                            relation_thought(rel, a, ra, b, rb)))
    return out


def pope_negative(scene: Scene, category: str, rng: random.Random) -> tuple[str, str]:
    """An absent (colour, shape) chosen the way POPE's `category` samples negatives."""
    present = {o.kind for o in scene.objects}
    absent = [k for k in _KINDS_BY_POPULARITY if k not in present]
    if category == "popular":
        return rng.choice(absent[:POPULAR_TOP_K])
    if category == "adversarial":
        colors, shapes = {c for c, _ in present}, {s for _, s in present}
        near = [k for k in absent if k[0] in colors or k[1] in shapes]
        return rng.choice(near or absent)
    return rng.choice(absent)


def exist_question(color: str, shape: str) -> str:
    phrase = f"{color} {shape}"
    return TEMPLATES["exist"][0].format(a=article(phrase), color=color, shape=shape)


def _exist(scene: Scene, rng: random.Random) -> list[Question]:
    present = sorted({o.kind for o in scene.objects})
    out = []
    for category in POPE_CATEGORIES:
        yes = Question("exist", exist_question(*rng.choice(present)), "yes", category)
        no = Question("exist", exist_question(*pope_negative(scene, category, rng)), "no", category)
        out.extend((yes, no) if rng.random() < 0.5 else (no, yes))
    return out


def _text(scene: Scene, rng: random.Random) -> list[Question]:
    out = [Question("text", TEMPLATES["has_text"][0], "yes" if scene.text else "no", "has_text")]
    if scene.text:
        out.append(Question("text", rng.choice(TEMPLATES["read"]), scene.text, "read"))
    return out


def _describe(scene: Scene, rng: random.Random) -> list[Question]:
    return [Question("describe", rng.choice(TEMPLATES["describe"]), canonical_caption(scene))]


QUESTION_MAKERS = {
    "count": _count, "color": _color, "shape": _shape, "position": _position,
    "exist": _exist, "text": _text, "describe": _describe,
}
assert tuple(QUESTION_MAKERS) == QUESTION_TYPES


def make_questions(scene: Scene, config: WorldConfig | None = None) -> list[Question]:
    """All questions of the scene for the config's question types, grouped by type.

    Per scene: count 2, color <=2, shape <=2, position <=2 (where + relation), exist 6
    (a yes and a no per POPE category), text 1-2, describe 1.
    """
    config = config or WorldConfig()
    rng = stream_rng(scene.seed, scene.index, STREAM_QUESTIONS)
    out: list[Question] = []
    for qtype in QUESTION_TYPES:
        # Always draw, so that enabling a type does not shift the draws of the others.
        questions = QUESTION_MAKERS[qtype](scene, rng)
        if qtype in config.question_types:
            out.extend(questions)
    return out
