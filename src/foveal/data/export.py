"""Writing the world in the formats other tools read: LLaVA JSON, VQAv2 JSON, POPE JSONL.

Design decisions:
- Every format points at the same `images/<id>.png` files, by a path relative to the
  folder holding the JSON (LLaVA's `--image_folder` convention), so one folder can serve
  stage 1, stage 2 and every evaluation.
- Files are streamed record by record: memory stays flat for any n.
- Field names follow the originals exactly (LLaVA-Instruct-150K, VQAv2 v2_OpenEnded /
  v2_mscoco annotations, POPE's coco_pope_*.json lines). Extra fields that help a reader
  without breaking the original tools are added: VQA questions carry "image", VQA
  annotations carry "category".
- The LM's text comes two ways: `corpus.txt`, one sentence a line, and `corpus.jsonl`, one scene
  document a line as `{"text": ...}` (the JSON-lines layout of pretraining corpora), whose text
  spans several lines.
- VQAv2 question ids follow VQAv2's own scheme, image_id * 1000 + k.
- The same arguments give byte-identical files: JSON key order is fixed and PNGs are written
  with fixed settings and no metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from foveal.data.dataset import Example, generate, scene_documents, text_corpus
from foveal.data.language import TEMPLATES, canonical_caption
from foveal.data.render import png_bytes
from foveal.data.world import STREAM_EXPORT, WorldConfig, check_count, check_seed, stream_rng
from foveal.engine.thinking import with_thought
from foveal.errors import ConfigError

IMAGE_DIR = "images"
LLAVA_KINDS = ("captions", "instruct")
CAPTION_STYLES = ("canonical", "mixed")
FORMATS = ("captions", "instruct", "vqa", "pope", "corpus", "documents")
TEXT_FORMATS = ("corpus", "documents")              # text only: no images
DEFAULT_FORMATS = ("captions", "instruct", "vqa", "pope")
FILENAMES = {
    "captions": "llava_captions.json",
    "instruct": "llava_instruct.json",
    "vqa_questions": "vqa_questions.json",
    "vqa_annotations": "vqa_annotations.json",
    "pope": "pope.jsonl",
    "corpus": "corpus.txt",
    "documents": "corpus.jsonl",
    "manifest": "dataset.json",
}


def image_path(ex: Example) -> str:
    return f"{IMAGE_DIR}/{ex.id}.png"


def save_image(ex: Example, out_dir: Path) -> None:
    if ex.image is None:
        raise ConfigError("this export needs images; generate the examples with images=True")
    (out_dir / image_path(ex)).write_bytes(png_bytes(ex.image))


# -- one record per example ----------------------------------------------------------------

def llava_record(ex: Example, kind: str = "instruct", turns: int | None = None, caption_style: str = "mixed",
                 think: bool = False, relation_thoughts: bool = False) -> dict:
    """One LLaVA conversation: a caption (stage 1) or several Q/A turns (stage 2). think: the first answer
    opens with a thought, the scene's canonical description between <think> tags (none when the question
    asks for that description), and later turns answer with it in context. relation_thoughts: a relation
    question's answer opens with its thought, where each of the two objects is (Question.thought)."""
    rng = stream_rng(ex.scene.seed, ex.scene.index, STREAM_EXPORT)
    if kind == "captions":
        caption = ex.captions[0] if caption_style == "canonical" else rng.choice(ex.captions)
        pairs = [(rng.choice(TEMPLATES["caption_prompt"]), caption, None)]
    else:
        # POPE asks a present object once per category; one conversation needs it once.
        pairs = list(dict.fromkeys((q.question, q.answer, q.thought) for q in ex.questions))
        rng.shuffle(pairs)  # otherwise turn order would give the question type away
        pairs = pairs[:turns]
    conversations = []
    for i, (question, answer, thought) in enumerate(pairs):
        if think and kind == "instruct" and i == 0 and question not in TEMPLATES["describe"]:
            answer = with_thought(answer, canonical_caption(ex.scene))
        elif relation_thoughts and thought:
            answer = with_thought(answer, thought)
        conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": ex.id, "image": image_path(ex), "conversations": conversations}


def vqa_records(ex: Example) -> list[tuple[dict, dict]]:
    """(question entry, annotation entry) pairs in VQAv2's layout, one per question."""
    out = []
    image_id = ex.scene.index
    for k, q in enumerate(ex.questions):
        qid = image_id * 1000 + k
        question = {"image_id": image_id, "question": q.question, "question_id": qid, "image": image_path(ex)}
        annotation = {
            "question_id": qid,
            "image_id": image_id,
            "question_type": q.type,
            "answer_type": q.answer_type,
            "multiple_choice_answer": q.answer,
            # Synthetic answers are certain: all ten "annotators" agree.
            "answers": [{"answer": q.answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
            "category": q.category,
        }
        out.append((question, annotation))
    return out


def pope_records(ex: Example) -> list[dict]:
    """POPE lines for the example's existence questions (question_id is set on writing)."""
    return [
        {"question_id": 0, "image": image_path(ex), "text": q.question, "label": q.answer, "category": q.category}
        for q in ex.questions
        if q.type == "exist"
    ]


# -- streaming writers ------------------------------------------------------------------------

class _JsonList:
    """Writes `{...head, key: [items]}` (or a bare list when key is None) item by item."""

    def __init__(self, path: Path, key: str | None = None, head: dict | None = None):
        self.file = open(path, "w", encoding="utf-8")
        self.path, self.key, self.count = path, key, 0
        if key is None:
            self.file.write("[")
        else:
            prefix = json.dumps({**(head or {}), key: []})[:-3]  # drop the closing `[]}`
            self.file.write(prefix + "[")

    def add(self, item: dict) -> None:
        self.file.write(("," if self.count else "") + "\n" + json.dumps(item))
        self.count += 1

    def close(self) -> Path:
        self.file.write("\n]" + ("}" if self.key else "") + "\n")
        self.file.close()
        return self.path


def _check(kind: str | None = None, turns: int | None = None, caption_style: str | None = None) -> None:
    if kind is not None and kind not in LLAVA_KINDS:
        raise ConfigError(f"unknown LLaVA export kind {kind!r}; choose from {', '.join(LLAVA_KINDS)}")
    if turns is not None and (isinstance(turns, bool) or not isinstance(turns, int) or turns < 1):
        raise ConfigError(f"turns must be a positive int or None (all questions); got {turns!r}")
    if caption_style is not None and caption_style not in CAPTION_STYLES:
        raise ConfigError(f"unknown caption_style {caption_style!r}; choose from {', '.join(CAPTION_STYLES)}")


def _prepare(out_dir: str | Path, images: bool = True) -> Path:
    out_dir = Path(out_dir)
    (out_dir / IMAGE_DIR if images else out_dir).mkdir(parents=True, exist_ok=True)
    return out_dir


def _vqa_head(what: str) -> dict:
    head = {"info": {"description": "foveal synthetic shapes world"}, "license": {}, "data_type": "shapes"}
    return {**head, "task_type": "Open-Ended"} if what == "questions" else head


# -- public exporters ----------------------------------------------------------------------------

def export_llava(
    examples: Iterable[Example],
    out_dir: str | Path,
    kind: str = "instruct",
    turns: int | None = None,
    caption_style: str = "mixed",
    filename: str | None = None,
    write_images: bool = True,
    think: bool = False,
    relation_thoughts: bool = False,
) -> Path:
    """LLaVA conversation JSON plus images/. kind="captions": one caption per image (stage
    1 alignment); kind="instruct": up to `turns` Q/A turns per image (stage 2)."""
    _check(kind, turns, caption_style)
    out_dir = _prepare(out_dir)
    writer = _JsonList(out_dir / (filename or FILENAMES[kind]))
    for ex in examples:
        writer.add(llava_record(ex, kind, turns, caption_style, think, relation_thoughts))
        if write_images:
            save_image(ex, out_dir)
    return writer.close()


def export_vqa(examples: Iterable[Example], out_dir: str | Path, write_images: bool = True) -> tuple[Path, Path]:
    """VQAv2-style questions and annotations JSON plus images/."""
    out_dir = _prepare(out_dir)
    qs = _JsonList(out_dir / FILENAMES["vqa_questions"], "questions", _vqa_head("questions"))
    anns = _JsonList(out_dir / FILENAMES["vqa_annotations"], "annotations", _vqa_head("annotations"))
    for ex in examples:
        for question, annotation in vqa_records(ex):
            qs.add(question)
            anns.add(annotation)
        if write_images:
            save_image(ex, out_dir)
    return qs.close(), anns.close()


def export_pope(examples: Iterable[Example], out_dir: str | Path, write_images: bool = True) -> Path:
    """POPE-style JSONL (one existence question a line, with its category) plus images/."""
    out_dir = _prepare(out_dir)
    path = out_dir / FILENAMES["pope"]
    qid = 0
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            for record in pope_records(ex):
                qid += 1
                f.write(json.dumps({**record, "question_id": qid}) + "\n")
            if write_images:
                save_image(ex, out_dir)
    return path


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    config: WorldConfig | None = None,
    formats: Iterable[str] = DEFAULT_FORMATS,
    start: int = 0,
    turns: int | None = None,
    caption_style: str = "mixed",
    think: bool = False,
    relation_thoughts: bool = False,
    document_thoughts: bool | None = None,
) -> dict[str, Path]:
    """Generate n examples once and write every format in `formats` (plus a manifest
    `dataset.json` recording how to regenerate them). Returns {file role: path}. think and
    relation_thoughts: see `llava_record` (the VQA and POPE files keep bare answers, what an evaluation
    compares). document_thoughts: whether the scene documents carry the relation thoughts too (None: as
    relation_thoughts)."""
    config = config or WorldConfig()
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"unknown format(s) {unknown or '(none given)'}; choose from {', '.join(FORMATS)}")
    n, seed, start = check_count(n), check_seed(seed), check_seed(start, "start")
    _check(turns=turns, caption_style=caption_style)
    document_thoughts = relation_thoughts if document_thoughts is None else document_thoughts
    out_dir = _prepare(out_dir, images=any(f not in TEXT_FORMATS for f in formats))

    written: dict[str, Path] = {}
    if "corpus" in formats:
        with open(out_dir / FILENAMES["corpus"], "w", encoding="utf-8") as f:
            for line in text_corpus(n, seed, config, start):
                f.write(line + "\n")
        written["corpus"] = out_dir / FILENAMES["corpus"]
    if "documents" in formats:
        with open(out_dir / FILENAMES["documents"], "w", encoding="utf-8") as f:
            for doc in scene_documents(n, seed, config, start, document_thoughts):
                f.write(json.dumps({"text": doc}) + "\n")
        written["documents"] = out_dir / FILENAMES["documents"]
    formats = tuple(f for f in formats if f not in TEXT_FORMATS)

    llava = {k: _JsonList(out_dir / FILENAMES[k]) for k in LLAVA_KINDS if k in formats}
    if "vqa" in formats:
        vqa_q = _JsonList(out_dir / FILENAMES["vqa_questions"], "questions", _vqa_head("questions"))
        vqa_a = _JsonList(out_dir / FILENAMES["vqa_annotations"], "annotations", _vqa_head("annotations"))
    pope = open(out_dir / FILENAMES["pope"], "w", encoding="utf-8") if "pope" in formats else None
    pope_id = 0
    for ex in generate(n, seed, config, start, images=bool(formats)):
        for kind, writer in llava.items():
            writer.add(llava_record(ex, kind, turns, caption_style, think, relation_thoughts))
        if "vqa" in formats:
            for question, annotation in vqa_records(ex):
                vqa_q.add(question)
                vqa_a.add(annotation)
        if pope:
            for record in pope_records(ex):
                pope_id += 1
                pope.write(json.dumps({**record, "question_id": pope_id}) + "\n")
        if formats:
            save_image(ex, out_dir)
    written.update({kind: w.close() for kind, w in llava.items()})
    if "vqa" in formats:
        written["vqa_questions"], written["vqa_annotations"] = vqa_q.close(), vqa_a.close()
    if pope:
        pope.close()
        written["pope"] = out_dir / FILENAMES["pope"]

    manifest = {"generator": "foveal.data", "seed": seed, "start": start, "n": n,
                "config": asdict(config), "turns": turns, "caption_style": caption_style, "think": think,
                "relation_thoughts": relation_thoughts, "document_thoughts": document_thoughts,
                "files": {k: p.name for k, p in written.items()}}
    (out_dir / FILENAMES["manifest"]).write_text(json.dumps(manifest, indent=2) + "\n")
    written["manifest"] = out_dir / FILENAMES["manifest"]
    return written
