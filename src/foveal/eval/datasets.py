"""Benchmark files on disk -> a flat list of `Item`s, each one prompt for the model.

Formats (detected from the file, or named with `format=`):
- "vqav2": VQAv2 questions JSON (`{"questions": [...]}`) + annotations JSON (`{"annotations":
  [...]}` with ten `answers`); images found by an `image` field, or by image_id as COCO names
  (`COCO_val2014_000000000042.jpg`, `000000000042.jpg`) or `<image_id>.jpg|png`.
- "textvqa": `{"data": [{"question_id", "image_id", "question", "answers": [...]}]}`.
- "pope": JSON lines `{"question_id", "image", "text", "label"[, "category"]}` (POPE's own files
  are JSON lines even when named .json); without a category the file's name is the category.
- "mmbench": MMBench TSV (index, question, [hint], A, B, C, D, answer, category, image as base64).
- "llava": LLaVA conversation JSON; each human/gpt turn becomes one exact-match question.

Design decisions:
- Loading checks everything scoring needs (answers, labels, images) before the first model
  call, so a long run never dies on item 4,000 because of a bad file.
- `limit` keeps the first N questions (before circular rotations are added).
- Every item has a stable `key`; the predictions file is keyed by it, which is what makes a run
  resumable and a limited run a prefix of the full one.
- Prompts: LLaVA's evaluation prompts, the question plus "Answer the question using a single
  word or phrase." (VQA, TextVQA, POPE) or the options plus "Answer with the option's letter
  from the given choices directly." (multiple choice).
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EvalDataError, EvalDataNotFoundError
from .metrics import majority_answer, pope_label, rotate_options

FORMATS = ("vqav2", "textvqa", "pope", "mmbench", "llava")
KIND_OF_FORMAT = {"vqav2": "vqa", "textvqa": "vqa", "pope": "pope", "mmbench": "mc", "llava": "exact"}
SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_ANSWER = "Answer with the option's letter from the given choices directly."
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass
class Item:
    key: str
    image: str | bytes | None       # absolute path, raw bytes (MMBench), or None (text only)
    question: str
    prompt: str
    type: str = "all"
    category: str = "all"
    answers: list[str] = field(default_factory=list)   # vqa / exact references
    reference: str | None = None                        # vqa / exact: the answer exact match uses
    label: str | None = None                            # pope: "yes" / "no"
    options: dict[str, str] | None = None               # mc: letter -> text, as shown
    answer: str | None = None                           # mc: correct letter, as shown
    group: str | None = None                            # mc: the question all rotations share
    rotation: int = 0


@dataclass
class Dataset:
    path: Path
    format: str
    items: list[Item]
    annotations: Path | None = None
    questions: int = 0                                  # before circular expansion

    @property
    def kind(self) -> str:
        return KIND_OF_FORMAT[self.format]

    @property
    def name(self) -> str:
        return self.path.stem

    def describe(self) -> dict:
        return {"path": str(self.path), "name": self.name, "format": self.format, "kind": self.kind,
                "annotations": str(self.annotations) if self.annotations else None,
                "questions": self.questions, "items": len(self.items)}


# ---- reading files ---------------------------------------------------------------------------

def _existing(path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalDataNotFoundError(f"{what} {str(path)!r} does not exist" if not p.exists()
                                    else f"{what} {str(path)!r} is not a file")
    return p.resolve()


def _read_json_or_lines(path: Path):
    """A JSON document, or a list of records if the file is JSON lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path} is not UTF-8 text: {e}") from None
    try:
        data = json.loads(text)
        # one JSON-lines record is also a JSON document: a .jsonl file is always a list
        return [data] if path.suffix.lower() == ".jsonl" and isinstance(data, dict) else data
    except json.JSONDecodeError as first:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) < 2 and first.msg != "Extra data":
            raise EvalDataError(f"{path} is not valid JSON: {first.msg} at line {first.lineno} "
                                f"column {first.colno}") from None
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path} is neither JSON nor JSON lines: line {n}: {e.msg}") from None
        return records


def detect_format(path: Path, data=None) -> str:
    if path.suffix.lower() in (".tsv", ".csv"):
        return "mmbench"
    data = _read_json_or_lines(path) if data is None else data
    if isinstance(data, dict):
        if "questions" in data:
            return "vqav2"
        if isinstance(data.get("data"), list):
            return "textvqa"
        if "annotations" in data:
            raise EvalDataError(f"{path} is a VQAv2 annotations file; pass the questions file as the "
                                "data and this one with --annotations")
    if isinstance(data, list) and data and isinstance(data[0], dict):
        first = data[0]
        if "conversations" in first:
            return "llava"
        if "label" in first and ("text" in first or "question" in first):
            return "pope"
    raise EvalDataError(f"cannot tell the format of {path}; name it with --format "
                        f"({', '.join(FORMATS)})")


class _ImageFinder:
    def __init__(self, data_path: Path, images: str | Path | None):
        self.roots = []
        if images is not None:
            root = Path(images).expanduser()
            if not root.is_dir():
                raise EvalDataNotFoundError(f"image folder {str(images)!r} does not exist")
            self.roots.append(root.resolve())
        self.roots += [data_path.parent, data_path.parent / "images"]
        self.missing: list[str] = []

    def find(self, names: list[str]) -> str | None:
        for name in names:
            p = Path(name).expanduser()
            if p.is_absolute():
                if p.is_file():
                    return str(p)
                continue
            for root in self.roots:
                if (root / p).is_file():
                    return str(root / p)
        self.missing.append(names[0])
        return None

    def check(self) -> None:
        if self.missing:
            where = ", ".join(str(r) for r in self.roots)
            raise EvalDataNotFoundError(f"{len(self.missing)} image(s) not found, first {self.missing[0]!r} "
                                        f"(looked in {where}); point --images at the image folder")


def _field(record, name: str, where: str):
    if not isinstance(record, dict):
        raise EvalDataError(f"{where} is not a JSON object")
    if name not in record:
        raise EvalDataError(f"{where} has no {name!r} field")
    return record[name]


def _dedupe(keys: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        n = seen.get(k, 0)
        seen[k] = n + 1
        out.append(k if n == 0 else f"{k}#{n}")
    return out


def _with_suffix(question: str, suffix: str) -> str:
    return f"{question}\n{suffix}" if suffix else question


# ---- one loader per format --------------------------------------------------------------------

def _annotations_path(questions: Path, given) -> Path:
    if given is not None:
        return _existing(given, "annotations file")
    name = questions.name
    for candidate in (name.replace("questions", "annotations"),
                      name.replace("OpenEnded_", "").replace("MultipleChoice_", "").replace("questions", "annotations")):
        if candidate != name and (questions.parent / candidate).is_file():
            return questions.parent / candidate
    raise EvalDataNotFoundError(f"VQAv2 questions {questions} need their annotations: pass --annotations FILE")


def _load_vqav2(path, data, annotations, finder, limit, suffix):
    questions = data.get("questions")
    if not isinstance(questions, list):
        raise EvalDataError(f"{path}: 'questions' must be a list")
    ann_path = _annotations_path(path, annotations)
    ann_data = _read_json_or_lines(ann_path)
    if not isinstance(ann_data, dict) or not isinstance(ann_data.get("annotations"), list):
        raise EvalDataError(f"{ann_path} is not a VQAv2 annotations file (no 'annotations' list)")
    by_id = {}
    for n, a in enumerate(ann_data["annotations"]):
        by_id[_field(a, "question_id", f"{ann_path} annotation {n}")] = a
    subtype = data.get("data_subtype")
    items = []
    for n, q in enumerate(questions[:limit]):
        where = f"{path} question {n}"
        qid = _field(q, "question_id", where)
        ann = by_id.get(qid)
        if ann is None:
            raise EvalDataError(f"{where}: question_id {qid} has no annotation in {ann_path}")
        answers = _field(ann, "answers", f"{ann_path} question_id {qid}")
        if not isinstance(answers, list):
            raise EvalDataError(f"{ann_path}: question_id {qid}: 'answers' must be a list")
        answers = [a.get("answer", "") if isinstance(a, dict) else a for a in answers]
        if not answers:
            raise EvalDataError(f"{ann_path}: question_id {qid} has no answers")
        image_id = q.get("image_id")
        names = [q["image"]] if q.get("image") else []
        if str(image_id).isdigit():             # COCO 2014 and 2017 file names
            names += ([f"COCO_{subtype}_{int(image_id):012d}.jpg"] if subtype else []) + [f"{int(image_id):012d}.jpg"]
        if image_id is not None:
            names += [f"{image_id}{ext}" for ext in IMAGE_EXTENSIONS]
        if not names:
            raise EvalDataError(f"{where} has neither an 'image' nor an 'image_id' field")
        question = str(_field(q, "question", where))
        items.append(Item(key=str(qid), image=finder.find(names), question=question,
                          prompt=_with_suffix(question, suffix), type=str(ann.get("question_type", "all")),
                          category=str(ann.get("category") or ann.get("answer_type") or "all"),
                          answers=[str(a) for a in answers],
                          reference=str(ann.get("multiple_choice_answer") or majority_answer(answers))))
    return items, ann_path


def _load_textvqa(path, data, finder, limit, suffix):
    items = []
    for n, q in enumerate(data["data"][:limit]):
        where = f"{path} data[{n}]"
        answers = _field(q, "answers", where)
        if not isinstance(answers, list) or not answers:
            raise EvalDataError(f"{where} has no answers list (a test split cannot be scored here)")
        image_id = q.get("image_id")
        names = ([q["image"]] if q.get("image") else []) + \
                ([f"{image_id}{ext}" for ext in IMAGE_EXTENSIONS] if image_id is not None else [])
        if not names:
            raise EvalDataError(f"{where} has neither an 'image' nor an 'image_id' field")
        question = str(_field(q, "question", where))
        items.append(Item(key=str(_field(q, "question_id", where)), image=finder.find(names), question=question,
                          prompt=_with_suffix(question, suffix), type=str(q.get("question_type", "all")),
                          category=str(q.get("category", "all")), answers=[str(a) for a in answers],
                          reference=majority_answer([str(a) for a in answers])))
    return items


def _load_pope(path, records, finder, limit, suffix):
    items = []
    for n, r in enumerate(records[:limit]):
        where = f"{path} line {n + 1}"
        if not isinstance(r, dict):
            raise EvalDataError(f"{where} is not a JSON object")
        question = str(r.get("text", r.get("question", "")))
        if not question:
            raise EvalDataError(f"{where} has no 'text' (question)")
        try:
            label = pope_label(_field(r, "label", where))
        except ValueError as e:
            raise EvalDataError(f"{where}: {e}") from None
        image = finder.find([str(_field(r, "image", where))])
        items.append(Item(key=str(r.get("question_id", n)), image=image, question=question,
                          prompt=_with_suffix(question, suffix), type=str(r.get("type", "exist")),
                          category=str(r.get("category") or path.stem), label=label))
    return items


def _load_llava(path, records, finder, limit, suffix):
    items = []
    for n, r in enumerate(records):
        where = f"{path} record {n}"
        turns = _field(r, "conversations", where)
        image = finder.find([str(r["image"])]) if r.get("image") else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise EvalDataError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
        for t in range(0, len(turns) - 1, 2):
            human, gpt = turns[t], turns[t + 1]
            if human.get("from") not in ("human", "user") or gpt.get("from") not in ("gpt", "assistant"):
                raise EvalDataError(f"{where} turn {t}: expected a human turn followed by a gpt turn")
            question = str(human.get("value", "")).replace("<image>\n", "").replace("<image>", "").strip()
            items.append(Item(key=f"{r.get('id', n)}:{t // 2}", image=image, question=question,
                              prompt=_with_suffix(question, suffix), type=str(r.get("type", "all")),
                              category=str(r.get("category", "all")), answers=[str(gpt.get("value", ""))],
                              reference=str(gpt.get("value", ""))))
            if limit is not None and len(items) >= limit:
                return items
    return items


def _load_mmbench(path, limit, suffix, circular):
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (UnicodeDecodeError, csv.Error) as e:
        raise EvalDataError(f"{path} is not a readable TSV file: {e}") from None
    if not rows:
        raise EvalDataError(f"{path} has no rows")
    columns = set(rows[0])
    missing = {"index", "question", "A", "B", "image"} - columns
    if missing:
        raise EvalDataError(f"{path} lacks MMBench column(s) {', '.join(sorted(missing))}")
    if "answer" not in columns:
        raise EvalDataError(f"{path} has no 'answer' column (a test split is scored by the MMBench server)")
    images_by_index = {r["index"]: r["image"] for r in rows}
    items = []
    for r in rows[:limit]:
        where = f"{path} index {r['index']}"
        options = {c: r[c].strip() for c in "ABCDEFGHI"
                   if c in r and r[c] is not None and r[c].strip() and r[c].strip().lower() != "nan"}
        answer = (r.get("answer") or "").strip()
        if answer not in options:
            raise EvalDataError(f"{where}: answer {answer!r} is not one of its options {sorted(options)}")
        raw = r["image"] or ""
        if raw.isdigit() and raw in images_by_index and len(raw) < 16:   # MMBench's "same image as row N"
            raw = images_by_index[raw]
        try:
            image = base64.b64decode(raw, validate=True) if raw else None
        except (binascii.Error, ValueError):
            raise EvalDataError(f"{where}: the image column is not base64") from None
        hint = (r.get("hint") or "").strip()
        question = (r.get("question") or "").strip()
        for k in range(len(options) if circular else 1):
            shown, letter = rotate_options(options, answer, k)
            text = f"{hint}\n{question}" if hint and hint.lower() != "nan" else question
            for c, option in shown.items():
                text += f"\n{c}. {option}"
            items.append(Item(key=f"{r['index']}" + (f"@{k}" if k else ""), image=image, question=question,
                              prompt=_with_suffix(text, suffix), type=str(r.get("l2-category") or "all"),
                              category=str(r.get("category") or "all"), options=shown, answer=letter,
                              group=str(r["index"]), rotation=k))
    return items


def load_dataset(path, *, format: str = "auto", annotations=None, images=None, limit: int | None = None,
                 circular: bool = False, prompt_suffix: str | None = None) -> Dataset:
    """Read a benchmark file into items. `prompt_suffix` replaces the standard instruction
    ("" sends the bare question)."""
    if format not in FORMATS + ("auto",):
        raise EvalDataError(f"unknown dataset format {format!r}; choose from auto, {', '.join(FORMATS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvalDataError(f"limit must be a positive integer, got {limit!r}")
    path = _existing(path, "dataset file")
    data = None
    if format == "auto":
        if path.suffix.lower() not in (".tsv", ".csv"):
            data = _read_json_or_lines(path)
        format = detect_format(path, data)
    elif format != "mmbench":
        data = _read_json_or_lines(path)
    if circular and format != "mmbench":
        raise EvalDataError(f"circular evaluation applies to multiple-choice (MMBench) files, not {format}")
    kind = KIND_OF_FORMAT[format]
    suffix = (MC_ANSWER if kind == "mc" else SHORT_ANSWER if kind in ("vqa", "pope") else "") \
        if prompt_suffix is None else prompt_suffix
    finder = _ImageFinder(path, images)
    ann_path = None
    shape_error = EvalDataError(f"{path} does not have the layout of a {format} file")
    if format == "vqav2":
        if not isinstance(data, dict):
            raise shape_error
        items, ann_path = _load_vqav2(path, data, annotations, finder, limit, suffix)
    elif format == "textvqa":
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise shape_error
        items = _load_textvqa(path, data, finder, limit, suffix)
    elif format == "pope":
        if not isinstance(data, list):
            raise shape_error
        items = _load_pope(path, data, finder, limit, suffix)
    elif format == "llava":
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise shape_error
        items = _load_llava(path, data, finder, limit, suffix)
    else:
        items = _load_mmbench(path, limit, suffix, circular)
    finder.check()
    if not items:
        raise EvalDataError(f"{path} holds no questions")
    keys = _dedupe([it.key for it in items])
    for it, key in zip(items, keys):
        it.key = key
    questions = len({it.group for it in items}) if kind == "mc" else len(items)
    return Dataset(path=path, format=format, items=items, annotations=ann_path, questions=questions)
