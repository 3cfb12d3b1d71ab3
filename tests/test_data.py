"""The synthetic shapes world: determinism, answers recomputed from the Scene by an
independent parser, POPE balance, legibility of the pixels, and the export formats."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from foveal.data import (
    COLORS,
    POPE_CATEGORIES,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    WorldConfig,
    canonical_caption,
    export_llava,
    export_pope,
    export_vqa,
    generate,
    make_questions,
    make_scene,
    object_prior,
    png_bytes,
    scene_documents,
    text_boxes,
    text_corpus,
    world_words,
    write_dataset,
)
from foveal.data.language import POPULAR_TOP_K, TEMPLATES
from foveal.data.render import FONT_5X7, glyph_mask
from foveal.data.world import BACKGROUND, CELL_NAMES, SHAPE_PLURALS, TEXT_ALPHABET, TEXT_COLOR
from foveal.errors import ConfigError, FovealError

N_CHECK = 300  # scenes checked per property test; ~0.1 s of generation


@pytest.fixture(scope="module")
def examples():
    return list(generate(N_CHECK, seed=7))


# -- an independent reading of questions and captions ----------------------------------------

RELATION_RE = r"Is the (.+?) (to the left of|left of|to the right of|right of|above|below) the (.+)\?"
CELL_BY_PHRASE = {f"{prep} the {cell}": cell for row in CELL_NAMES for cell in row for prep in ("at", "on", "in")}

SIZE_RE, COLOR_RE, SHAPE_RE = "|".join(SIZES), "|".join(COLORS), "|".join(SHAPES)
PLURAL_TO_SHAPE = {p: s for s, p in SHAPE_PLURALS.items()}


def matching(scene, words: str):
    """Objects that fit a description like "large red circle" or "red object"."""
    attrs = {}
    for w in words.split():
        if w in SIZES:
            attrs["size"] = w
        elif w in COLORS:
            attrs["color"] = w
        elif w in SHAPES:
            attrs["shape"] = w
        else:
            assert w == "object", words
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]


def the_one(scene, words: str):
    found = matching(scene, words)
    assert len(found) == 1, f"'the {words}' is ambiguous or absent in {scene}"
    return found[0]


def expected_answer(scene, q) -> str:
    text = q.question
    if m := re.fullmatch(r"How many (shapes|objects) (are there|are in the image)\?", text):
        return str(len(scene.objects))
    if m := re.fullmatch(r"How many (.+) (are there|are in the image)\?", text):
        words = m.group(1).split()
        color = words[0] if words[0] in COLORS else None
        noun = words[-1]
        shape = PLURAL_TO_SHAPE.get(noun)
        assert shape or noun == "shapes"
        return str(sum((color is None or o.color == color) and (shape is None or o.shape == shape)
                       for o in scene.objects))
    if m := re.fullmatch(r"(What color is|What is the color of) the (.+)\?", text):
        assert not re.search(COLOR_RE, m.group(2)), "a colour question must not name the colour"
        return the_one(scene, m.group(2)).color
    if m := re.fullmatch(r"(What shape is|What is the shape of) the (.+)\?", text):
        assert m.group(2).endswith("object"), "a shape question must not name the shape"
        return the_one(scene, m.group(2)).shape
    if m := re.fullmatch(r"(Where is|In which part of the image is) the (.+)\?", text):
        return the_one(scene, m.group(2)).cell
    if m := re.fullmatch(RELATION_RE, text):
        a, rel, b = the_one(scene, m.group(1)), m.group(2), the_one(scene, m.group(3))
        assert a is not b
        holds = {"left": a.col < b.col, "right": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}
        return "yes" if holds[rel.split()[-2] if " of" in rel else rel] else "no"
    if m := re.fullmatch(rf"Is there an? ({COLOR_RE}) ({SHAPE_RE}) in the image\?", text):
        return "yes" if matching(scene, f"{m.group(1)} {m.group(2)}") else "no"
    if text == "Is there any text in the image?":
        return "yes" if scene.text else "no"
    if text in ("What does the text say?", "What is written in the image?", "Read the text in the image."):
        assert scene.text
        return scene.text
    if text in ("Describe the image.", "What is in the image?", "Describe the scene."):
        return canonical_caption(scene)
    raise AssertionError(f"unrecognised question {text!r}")


def parse_caption(caption: str) -> tuple[list[tuple[str, str, str, str]], str | None]:
    """Canonical caption -> [(size, colour, shape, cell)], text; the inverse of the generator."""
    items = re.split(r", | and (?=an? |the text)", caption)
    objects, text = [], None
    for item in items:
        if m := re.fullmatch(r"the text (\S+) (at the top|in the middle|at the bottom)", item):
            text = m.group(1)
            continue
        m = re.fullmatch(rf"an? ({SIZE_RE}) ({COLOR_RE}) ({SHAPE_RE}) (.+)", item)
        assert m, item
        objects.append((m.group(1), m.group(2), m.group(3), CELL_BY_PHRASE[m.group(4)]))
    return objects, text


# -- determinism ----------------------------------------------------------------------------------

def dir_bytes(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_other_seeds_differ(tmp_path):
    formats = ("captions", "instruct", "vqa", "pope", "corpus")
    write_dataset(tmp_path / "a", 30, seed=3, formats=formats)
    write_dataset(tmp_path / "b", 30, seed=3, formats=formats)
    write_dataset(tmp_path / "c", 30, seed=4, formats=formats)
    a, b, c = (dir_bytes(tmp_path / x) for x in "abc")
    assert len([k for k in a if k.startswith("images/")]) == 30
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) >= 25
    assert a["llava_instruct.json"] != c["llava_instruct.json"]


def test_a_scene_depends_only_on_seed_and_index():
    whole = list(generate(12, seed=5))
    part = list(generate(4, seed=5, start=8))
    assert [e.scene for e in part] == [e.scene for e in whole[8:]]
    assert [e.questions for e in part] == [e.questions for e in whole[8:]]
    assert [png_bytes(e.image) for e in part] == [png_bytes(e.image) for e in whole[8:]]
    # Turning question types off does not move the pictures or the other questions.
    only = WorldConfig(question_types=("color", "exist"))
    for e in whole[:5]:
        scene = make_scene(5, e.scene.index, only)
        assert scene == e.scene
        assert make_questions(scene, only) == [q for q in e.questions if q.type in ("color", "exist")]


def test_a_seed_gives_the_same_scene_content_at_every_image_size():
    def content(size):
        return [(ex.scene.text, ex.scene.text_row, [(o.shape, o.color, o.size, o.cell) for o in ex.scene.objects],
                 ex.questions) for ex in generate(20, seed=8, config=WorldConfig(image_size=size), images=False)]

    assert content(48) == content(64) == content(96)


def test_generate_does_not_touch_global_rngs():
    import random

    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    list(generate(5, seed=1))
    assert (random.random(), np.random.rand()) == expected


# -- answers agree with the scene -------------------------------------------------------------------

def test_every_answer_recomputes_from_the_scene(examples):
    seen = Counter()
    for ex in examples:
        for q in ex.questions:
            assert q.type in QUESTION_TYPES
            assert q.answer == expected_answer(ex.scene, q), (q, ex.scene)
            seen[q.type, q.category] += 1
    for qtype in QUESTION_TYPES:
        assert sum(v for (t, _), v in seen.items() if t == qtype) >= 100, qtype
    assert seen["position", "relation"] > 50 and seen["text", "read"] > 50


def test_a_relation_thought_places_both_objects_and_decides_the_answer(examples):
    cells = {cell: (r, c) for r, row in enumerate(CELL_NAMES) for c, cell in enumerate(row)}
    relations = 0
    for ex in examples:
        for q in ex.questions:
            if q.category != "relation":
                assert q.thought is None, q                      # only relations need steps
                continue
            relations += 1
            m = re.fullmatch(RELATION_RE, q.question)
            t = re.fullmatch(r"the (.+?) is ((?:at|on|in) the [a-z ]+?), (column|row) ([1-3]), and "
                             r"the (.+?) is ((?:at|on|in) the [a-z ]+?), (column|row) ([1-3]); "
                             r"is ([1-3]) less than ([1-3])\?", q.thought)
            assert m and t, q
            assert (t.group(1), t.group(5)) == (m.group(1), m.group(3))          # named as the question names them
            a, b = the_one(ex.scene, m.group(1)), the_one(ex.scene, m.group(3))
            assert (CELL_BY_PHRASE[t.group(2)], CELL_BY_PHRASE[t.group(6)]) == (a.cell, b.cell)
            rel = m.group(2).replace("to the ", "").replace(" of", "")
            axis = "column" if rel in ("left", "right") else "row"
            assert t.group(3) == t.group(7) == axis
            # each number is its cell's column or row, counted from 1, and the two numbers decide the answer
            for cell, number in ((CELL_BY_PHRASE[t.group(2)], t.group(4)), (CELL_BY_PHRASE[t.group(6)], t.group(8))):
                assert int(number) == cells[cell][axis == "column"] + 1
            na, nb = int(t.group(4)), int(t.group(8))
            holds = {"left": na < nb, "right": na > nb, "above": na < nb, "below": na > nb}[rel]
            assert q.answer == ("yes" if holds else "no")
            # the last step asks one comparison, always "less than": its answer is the question's
            x, y = int(t.group(9)), int(t.group(10))
            assert (x, y) == ((na, nb) if rel in ("left", "above") else (nb, na))
            assert q.answer == ("yes" if x < y else "no")
    assert relations > 50


def test_relation_thoughts_open_relation_answers_in_instruct_records_and_documents(tmp_path):
    from foveal.engine.thinking import split_thinking
    exs = list(generate(40, seed=4))
    plain = json.loads(export_llava(exs, tmp_path / "plain", kind="instruct", write_images=False).read_text())
    rel = json.loads(export_llava(exs, tmp_path / "rel", kind="instruct", write_images=False,
                                  relation_thoughts=True).read_text())
    thoughts = 0
    for p, r, ex in zip(plain, rel, exs):
        by_question = {q.question: q for q in ex.questions}
        assert [t["value"] for t in p["conversations"][::2]] == [t["value"] for t in r["conversations"][::2]]
        for (q_turn, plain_turn), rel_turn in zip(zip(p["conversations"][::2], p["conversations"][1::2]),
                                                 r["conversations"][1::2]):
            q = by_question[q_turn["value"].removeprefix("<image>\n")]
            thought, answer = split_thinking(rel_turn["value"])
            assert answer == plain_turn["value"] == q.answer           # the same answer, after the thought
            assert thought == (q.thought or "")
            thoughts += bool(thought)
    assert thoughts > 10
    docs = list(scene_documents(40, seed=4, relation_thoughts=True))
    bare = list(scene_documents(40, seed=4))
    for doc, plain_doc, ex in zip(docs, bare, exs):
        relation = [q for q in ex.questions if q.thought]
        for q in relation:
            assert f"{q.question} <think>{q.thought}</think>{q.answer}" in doc.split("\n")
        assert doc.count("<think>") == len(relation)
        assert doc.replace("<think>", "").count("\n") == plain_doc.count("\n")
    assert not any("<think>" in d for d in bare)
    # VQA and POPE files keep the bare answers an evaluation compares
    written = write_dataset(tmp_path / "all", 40, seed=4, formats=("vqa", "pope", "instruct"), relation_thoughts=True)
    assert "<think>" not in written["vqa_annotations"].read_text() + written["pope"].read_text()
    assert "<think>" in written["instruct"].read_text()
    assert json.loads(written["manifest"].read_text())["relation_thoughts"] is True


def test_describe_answer_lists_exactly_the_scene(examples):
    for ex in examples:
        objects, text = parse_caption(canonical_caption(ex.scene))
        assert objects == [(o.size, o.color, o.shape, o.cell) for o in ex.scene.objects]
        assert text == ex.scene.text
        assert ex.captions[0] == canonical_caption(ex.scene)


def test_objects_fill_distinct_cells_without_overlap(examples):
    for ex in examples:
        objs = ex.scene.objects
        assert 1 <= len(objs) <= 4
        assert len({(o.row, o.col) for o in objs}) == len(objs)
        assert ex.scene.text_row not in {o.row for o in objs}
        for a, b in combinations(objs, 2):
            ax0, ay0, ax1, ay1 = a.bbox
            bx0, by0, bx1, by1 = b.bbox
            assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0


def test_yes_no_answers_are_balanced(examples):
    answers = [q.answer for ex in examples for q in ex.questions
               if q.category == "relation" or q.type == "exist"]
    assert 0.45 <= answers.count("yes") / len(answers) <= 0.55
    counts = Counter(q.answer for ex in examples for q in ex.questions if q.category == "all")
    assert set(counts) == {"1", "2", "3", "4"}


def test_answers_are_short_canonical_strings_from_a_closed_vocabulary(examples):
    vocab = set(world_words())
    for line in text_corpus(100, seed=2):
        words = set(re.findall(r"[A-Za-z0-9]+", line)) - vocab
        assert all(set(w) <= set(TEXT_ALPHABET) for w in words), line  # what remains is read text
    for ex in examples:
        for q in ex.questions:
            if q.type == "describe":
                continue
            assert q.answer == q.answer.strip() and len(q.answer.split()) <= 2
            if q.category != "read":
                assert q.answer == q.answer.lower()


# -- POPE -----------------------------------------------------------------------------------------

def test_pope_is_balanced_per_category_and_negatives_are_absent(examples):
    prior = object_prior()
    ranked = sorted(prior, key=lambda k: (-prior[k], k))
    by_category = {c: [] for c in POPE_CATEGORIES}
    for ex in examples:
        present = {o.kind for o in ex.scene.objects}
        for q in ex.questions:
            if q.type != "exist":
                continue
            by_category[q.category].append(q.answer)
            color, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q.question).groups()
            assert ((color, shape) in present) == (q.answer == "yes")
            if q.answer == "no" and q.category == "popular":
                assert (color, shape) in [k for k in ranked if k not in present][:POPULAR_TOP_K]
            if q.answer == "no" and q.category == "adversarial":
                assert any(color == c or shape == s for c, s in present)
    for category, answers in by_category.items():
        assert len(answers) == 2 * len(examples)
        assert answers.count("yes") == answers.count("no"), category


def test_popular_negatives_are_the_frequent_objects(examples):
    """Non-uniform priors are what make "popular" differ from "random"."""
    prior = object_prior()
    assert abs(sum(prior.values()) - 1) < 1e-9
    negatives = {c: [] for c in POPE_CATEGORIES}
    for ex in examples:
        for q in ex.questions:
            if q.type == "exist" and q.answer == "no":
                color, shape = q.question.split()[-5:-3]
                negatives[q.category].append(prior[color, shape])
    assert np.mean(negatives["popular"]) > 1.5 * np.mean(negatives["random"])
    drawn = Counter(o.kind for ex in examples for o in ex.scene.objects)
    top = max(prior, key=prior.get)
    assert drawn[top] > drawn[min(prior, key=prior.get)]


# -- pixels ------------------------------------------------------------------------------------------

def test_objects_are_drawn_in_their_colour_inside_their_box(examples):
    for ex in examples[:100]:
        pixels = np.asarray(ex.image)
        assert pixels.shape == (64, 64, 3)
        painted = np.zeros(pixels.shape[:2], bool)
        for o in ex.scene.objects:
            x0, y0, x1, y1 = o.bbox
            box = pixels[y0:y1 + 1, x0:x1 + 1]
            inside = (box == COLORS[o.color]).all(-1)
            assert inside.mean() > 0.3, (o, inside.mean())
            assert (pixels[(y0 + y1) // 2, (x0 + x1) // 2] == COLORS[o.color]).all()
            painted[y0:y1 + 1, x0:x1 + 1] = True
        # Outside the objects' boxes there is only background and text.
        outside = pixels[~painted]
        ok = (outside == BACKGROUND).all(-1) | (outside == TEXT_COLOR).all(-1)
        assert ok.all()


def test_sizes_are_distinct_pixel_sizes():
    sides = {}
    for ex in generate(200, seed=9, images=False):
        for o in ex.scene.objects:
            sides.setdefault(o.size, set()).add(o.bbox[2] - o.bbox[0])
    assert all(len(s) == 1 for s in sides.values()), sides
    small, medium, large = (sides[k].pop() for k in SIZES)
    assert small + 3 <= medium and medium + 3 <= large


def read_text(image: Image.Image, scene) -> str:
    """Template matching against the font: text is legible iff this recovers it."""
    pixels = (np.asarray(image) == TEXT_COLOR).all(-1)
    out = ""
    for x0, y0, x1, y1 in text_boxes(scene):
        crop = pixels[y0:y1, x0:x1]
        assert crop.any(), "text box is empty"
        scores = {ch: (crop == np.asarray(glyph_mask(ch, scene.text_scale))).mean() for ch in TEXT_ALPHABET}
        out += max(scores, key=scores.get)
    return out


@pytest.mark.parametrize("size", [48, 64, 96])
def test_text_is_legible(size):
    texts = 0
    for ex in generate(60, seed=11, config=WorldConfig(image_size=size, text_prob=1.0)):
        assert ex.image.size == (size, size)
        assert ex.scene.text_scale >= 2  # a font dot is at least 2x2 pixels
        ink = (np.asarray(ex.image) == TEXT_COLOR).all(-1).sum()
        dots = sum(FONT_5X7[ch].count("#") for ch in ex.scene.text)
        assert ink == dots * ex.scene.text_scale ** 2  # nothing overdraws the text
        assert read_text(ex.image, ex.scene) == ex.scene.text
        texts += 1
    assert texts == 60


def test_glyphs_differ_by_several_dots():
    masks = {ch: np.array([c == "#" for c in FONT_5X7[ch].replace("|", "")]) for ch in TEXT_ALPHABET}
    assert min((masks[a] != masks[b]).sum() for a, b in combinations(TEXT_ALPHABET, 2)) >= 3


# -- exports ------------------------------------------------------------------------------------------

def check_image(root, rel, size=64):
    with Image.open(root / rel) as im:
        assert im.format == "PNG" and im.size == (size, size) and im.mode == "RGB"


def test_llava_exports_parse_and_follow_the_format(tmp_path):
    exs = list(generate(10, seed=1))
    cap = json.loads(export_llava(exs, tmp_path, kind="captions").read_text())
    inst = json.loads(export_llava(exs, tmp_path, kind="instruct", turns=5).read_text())
    full = json.loads(export_llava(exs, tmp_path / "all", kind="instruct").read_text())
    assert len(cap) == len(inst) == 10
    for records, turns in ((cap, 1), (inst, 5)):
        for rec, ex in zip(records, exs):
            assert set(rec) == {"id", "image", "conversations"}
            assert rec["id"] == ex.id and rec["image"] == f"images/{ex.id}.png"
            check_image(tmp_path, rec["image"])
            conv = rec["conversations"]
            assert len(conv) == 2 * min(turns, len({q.question for q in ex.questions}))
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n")
            assert sum("<image>" in t["value"] for t in conv) == 1
    assert all(r["conversations"][1]["value"] in ex.captions for r, ex in zip(cap, exs))
    for rec, ex in zip(full, exs):
        pairs = {(h["value"].removeprefix("<image>\n"), g["value"])
                 for h, g in zip(rec["conversations"][::2], rec["conversations"][1::2])}
        assert pairs == {(q.question, q.answer) for q in ex.questions}


def test_vqa_export_parses_and_follows_the_format(tmp_path):
    exs = list(generate(10, seed=1))
    qpath, apath = export_vqa(exs, tmp_path)
    questions = json.loads(qpath.read_text())["questions"]
    annotations = json.loads(apath.read_text())["annotations"]
    assert len(questions) == len(annotations) == sum(len(e.questions) for e in exs)
    assert len({q["question_id"] for q in questions}) == len(questions)
    by_id = {a["question_id"]: a for a in annotations}
    flat = [(e, q) for e in exs for q in e.questions]
    for entry, (ex, q) in zip(questions, flat):
        assert {"image_id", "question", "question_id"} <= set(entry)
        assert entry["image_id"] == ex.scene.index and entry["question"] == q.question
        check_image(tmp_path, entry["image"])
        ann = by_id[entry["question_id"]]
        assert ann["image_id"] == entry["image_id"]
        assert ann["question_type"] == q.type and ann["multiple_choice_answer"] == q.answer
        assert ann["answer_type"] in ("yes/no", "number", "other")
        assert ann["answer_type"] == ("yes/no" if q.answer in ("yes", "no") else
                                      "number" if q.answer.isdigit() else "other")
        assert len(ann["answers"]) == 10
        assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
        assert all(a["answer"] == q.answer and a["answer_confidence"] == "yes" for a in ann["answers"])


def test_pope_export_parses_and_is_balanced(tmp_path):
    path = export_pope(generate(20, seed=2), tmp_path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 20 * 6
    assert [r["question_id"] for r in lines] == list(range(1, len(lines) + 1))
    for r in lines:
        assert set(r) == {"question_id", "image", "text", "label", "category"}
        assert r["label"] in ("yes", "no") and r["category"] in POPE_CATEGORIES
        check_image(tmp_path, r["image"])
    for c in POPE_CATEGORIES:
        labels = [r["label"] for r in lines if r["category"] == c]
        assert labels.count("yes") == labels.count("no") == 20


def test_write_dataset_writes_every_format_once_and_a_manifest(tmp_path):
    written = write_dataset(tmp_path, 8, seed=6, formats=("captions", "instruct", "vqa", "pope", "corpus"),
                            turns=3, config=WorldConfig(image_size=96))
    assert set(written) == {"captions", "instruct", "vqa_questions", "vqa_annotations", "pope", "corpus", "manifest"}
    manifest = json.loads(written["manifest"].read_text())
    assert manifest["seed"] == 6 and manifest["n"] == 8 and manifest["config"]["image_size"] == 96
    inst = json.loads(written["instruct"].read_text())
    assert all(len(r["conversations"]) == 6 for r in inst)
    check_image(tmp_path, inst[0]["image"], size=96)
    # The one-pass writer and the single-format exporters agree.
    solo = export_pope(generate(8, seed=6, config=WorldConfig(image_size=96)), tmp_path / "solo")
    assert solo.read_bytes() == written["pope"].read_bytes()
    corpus = set(written["corpus"].read_text().splitlines())
    for ex in generate(8, seed=6, images=False):
        assert set(ex.captions) <= corpus
        assert {f"{q.question} {q.answer}" for q in ex.questions} <= corpus


def test_scene_documents_keep_each_question_with_the_captions_that_answer_it(tmp_path):
    docs = list(scene_documents(20, seed=4))
    assert docs == list(scene_documents(20, seed=4))                          # deterministic
    for doc, ex in zip(docs, generate(20, seed=4, images=False)):
        lines = doc.split("\n")
        assert lines[:3] == ex.captions                                         # the captions come first
        assert any(lines[3] == f"{p} {ex.captions[0]}" for p in TEMPLATES["caption_prompt"])
        pairs = {f"{q.question} {q.answer}" for q in ex.questions}
        assert sorted(lines[4:]) == sorted(pairs)                               # every question once
    orders = {tuple(d.split("\n")[4:7]) for d in docs}
    assert len(orders) == 20                                                    # shuffled, not grouped by type
    written = write_dataset(tmp_path, 20, seed=4, formats=("documents",))
    assert [json.loads(line)["text"] for line in written["documents"].read_text().splitlines()] == docs
    assert not (tmp_path / "images").exists()                                   # text only: no pictures


def test_command_line_writes_a_dataset(tmp_path, capsys):
    from foveal.data.__main__ import main

    assert main([str(tmp_path), "--n", "3", "--seed", "1", "--formats", "pope"]) == 0
    assert (tmp_path / "pope.jsonl").exists() and len(list((tmp_path / "images").iterdir())) == 3
    assert main([str(tmp_path / "think"), "--n", "3", "--formats", "instruct", "documents", "--think"]) == 0
    records = json.loads((tmp_path / "think" / "llava_instruct.json").read_text())
    assert any(r["conversations"][1]["value"].startswith("<think>") for r in records)
    assert (tmp_path / "think" / "corpus.jsonl").read_text().count("\n") == 3
    assert main([str(tmp_path / "rel"), "--n", "30", "--formats", "instruct", "documents", "--relation-thoughts"]) == 0
    records = (tmp_path / "rel" / "llava_instruct.json").read_text()
    assert records.count("<think>the ") == (tmp_path / "rel" / "corpus.jsonl").read_text().count("<think>the ") > 0
    assert main([str(tmp_path), "--n", "3", "--image-size", "16"]) == 2
    assert "image_size" in capsys.readouterr().err


# -- bad options ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: list(generate(-1)), "n must be"),
    (lambda: list(generate(2, seed=-3)), "seed must be"),
    (lambda: list(generate(2.5)), "n must be"),
    (lambda: WorldConfig(question_types=("count", "weather")), "unknown question type"),
    (lambda: WorldConfig(question_types=()), "unknown question type"),
    (lambda: WorldConfig(image_size=32), "image_size"),
    (lambda: WorldConfig(min_objects=3, max_objects=2), "min_objects"),
    (lambda: WorldConfig(max_objects=7), "max_objects"),
    (lambda: WorldConfig(text_prob=1.5), "text_prob"),
    (lambda: write_dataset("/tmp/unused-foveal", 1, formats=("coco",)), "unknown format"),
    (lambda: export_llava([], "/tmp/unused-foveal", kind="stage3"), "kind"),
    (lambda: export_llava([], "/tmp/unused-foveal", turns=0), "turns"),
])
def test_bad_options_raise_a_clear_config_error(call, message):
    with pytest.raises(ConfigError, match=message) as info:
        call()
    assert isinstance(info.value, (FovealError, ValueError))


def test_thinking_instruct_records_open_with_the_scene_description(tmp_path):
    from foveal.engine.thinking import split_thinking
    exs = list(generate(30, seed=4))
    plain = json.loads(export_llava(exs, tmp_path / "plain", kind="instruct", write_images=False).read_text())
    think = json.loads(export_llava(exs, tmp_path / "think", kind="instruct", write_images=False,
                                    think=True).read_text())
    describing = 0
    for p, t, ex in zip(plain, think, exs):
        first_question = t["conversations"][0]["value"].removeprefix("<image>\n")
        thought, answer = split_thinking(t["conversations"][1]["value"])
        assert answer == p["conversations"][1]["value"]           # the same answer, after the thought
        if first_question in TEMPLATES["describe"]:
            describing += 1
            assert thought == ""                                 # the description is the answer itself
        else:
            assert thought == canonical_caption(ex.scene)
        assert t["conversations"][2:] == p["conversations"][2:]   # later turns read it in context
    assert 0 < describing < len(exs)
    captions = json.loads(export_llava(exs, tmp_path / "cap", kind="captions", write_images=False,
                                       think=True).read_text())
    assert not any("<think>" in turn["value"] for r in captions for turn in r["conversations"])
