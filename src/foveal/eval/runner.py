"""Run a dataset through a backend, keep every answer, score, and write the report.

Files of one run, all named after the report (`--out RUN.json`):
  RUN.json                 the report: overall, per type, per category, counts, backend, dataset, date
  RUN.predictions.jsonl    one line per answered item, written as it comes (the resume state)
  RUN.png                  a bar chart of the main metric per type and per category

Design decisions:
- The predictions file starts with a header line naming what produced it (dataset file, backend
  and model, prompt instruction, max tokens). A rerun of the same command reads it, skips the
  items already answered and appends the rest; a rerun with a different model or prompt is
  refused rather than silently mixed (`restart=True` / `--restart` starts over).
- An item the backend refused (ItemError) is stored with its error, counts as wrong, and is
  asked again on the next resume.
- Each line is flushed as written, so Ctrl-C or a crash loses at most the item in flight; a
  torn last line is cut off on resume.
- Scores are computed from the stored answers at the end, never stored per line, so the
  report of a resumed run equals the report of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from .backends import ItemError
from .datasets import Dataset, Item
from .errors import EvalConfigError, ResumeMismatchError
from .metrics import (PRIMARY_METRIC, breakdown, exact_match, extract_choice, pope_parse, summarize,
                      vqa_accuracy)

REPORT_VERSION = 1
# Room for a short thought before a short answer (a recipe model trained with --relation-thoughts writes
# up to ~30 tokens of thought before a relation answer); a model that answers at once stops at its end
# token long before.
DEFAULT_MAX_TOKENS = 64


def output_paths(report: str | Path) -> tuple[Path, Path, Path]:
    report = Path(report)
    if report.suffix != ".json":
        report = report.with_name(report.name + ".json")
    stem = report.with_suffix("")
    return report, stem.with_name(stem.name + ".predictions.jsonl"), stem.with_suffix(".png")


def default_report_path(dataset: Dataset, backend) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset.name}-{backend.short_name}").strip("_")
    return Path("foveal-eval") / f"{name}.json"


def score_item(item: Item, kind: str, prediction: str, error: str | None = None) -> dict:
    record = {"key": item.key, "type": item.type, "category": item.category, "prediction": prediction}
    if error:
        record["error"] = error
    if kind in ("vqa", "exact"):
        record["exact_match"] = exact_match(prediction, item.reference)
        if kind == "vqa":
            record["vqa_accuracy"] = vqa_accuracy(prediction, item.answers)
    elif kind == "pope":
        record["parsed"], record["label"] = pope_parse(prediction), item.label
    elif kind == "mc":
        extracted = extract_choice(prediction, item.options)
        record.update(extracted=extracted, answer=item.answer, correct=extracted == item.answer,
                      group=item.group, rotation=item.rotation)
    return record


def build_report(dataset: Dataset, records: list[dict], backend_info: dict, settings: dict,
                 elapsed_s: float | None = None) -> dict:
    kind = dataset.kind
    primary = PRIMARY_METRIC[kind]
    if kind == "mc" and any(r.get("rotation") for r in records):
        primary = "circular_accuracy"
    return {
        "foveal_eval": REPORT_VERSION,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset.describe(),
        "backend": backend_info,
        "settings": settings,
        "primary_metric": primary,
        "overall": summarize(kind, records),
        "per_type": breakdown(kind, records, "type"),
        "per_category": breakdown(kind, records, "category"),
        "elapsed_s": round(elapsed_s, 3) if elapsed_s is not None else None,
    }


# ---- the predictions file -------------------------------------------------------------------------

def _read_predictions(path: Path, header: dict) -> dict[str, dict]:
    """Answers already on disk, keyed by item; cuts a torn last line; refuses another run's file."""
    raw = path.read_bytes()
    done: dict[str, dict] = {}
    keep = 0                                    # bytes that hold complete lines
    for n, line in enumerate(raw.splitlines(keepends=True)):
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break                               # a torn write; nothing valid follows it
        if n == 0:
            old = rec.get("header") if isinstance(rec, dict) else None
            if old is None:
                raise ResumeMismatchError(f"{path} is not a foveal predictions file; remove it or pass --restart")
            diff = [k for k in header if old.get(k) != header[k]]
            if diff:
                what = "; ".join(f"{k} was {old.get(k)!r}, is now {header[k]!r}" for k in diff)
                raise ResumeMismatchError(f"{path} holds answers from a different run ({what}); pass --restart "
                                          "to start over, or choose another --out")
        elif isinstance(rec, dict) and "key" in rec:
            done[str(rec["key"])] = rec
        keep += len(line)
    if keep == 0 and raw:
        raise ResumeMismatchError(f"{path} is not a foveal predictions file; remove it or pass --restart")
    if keep < len(raw) or not raw.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(keep)
            if keep and not raw[:keep].endswith(b"\n"):
                f.seek(keep)
                f.write(b"\n")
    return done


def run_eval(dataset: Dataset, backend, out: str | Path | None = None, *, max_tokens: int = DEFAULT_MAX_TOKENS,
             restart: bool = False, progress: bool | None = None, chart: bool = True) -> dict:
    """Answer every item not answered yet, then score and write the report (and chart).
    Returns the report dict; its "files" entry names what was written."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise EvalConfigError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    report_path, preds_path, chart_path = output_paths(out or default_report_path(dataset, backend))
    report_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"max_tokens": max_tokens, "temperature": 0.0,
                "prompt_example": dataset.items[0].prompt, "circular": any(it.rotation for it in dataset.items)}
    header = {"dataset": str(dataset.path), "format": dataset.format, "backend": backend.identity(),
              "max_tokens": max_tokens, "prompt_example": dataset.items[0].prompt}
    # The first item's prompt stands for the instruction; items differ only in their question.
    if restart and preds_path.exists():
        preds_path.unlink()
    done = _read_predictions(preds_path, header) if preds_path.exists() else {}
    if not preds_path.exists() or preds_path.stat().st_size == 0:
        preds_path.write_text(json.dumps({"header": header}) + "\n", encoding="utf-8")

    # Items that failed before are asked again: the cause (a server limit, a fixed file) may be gone.
    todo = [it for it in dataset.items if it.key not in done or done[it.key].get("error")]
    from tqdm import tqdm
    bar = tqdm(total=len(dataset.items), initial=len(dataset.items) - len(todo), unit="q",
               desc=f"eval {dataset.name}", disable=None if progress is None else not progress, leave=False)
    start = time.perf_counter()
    try:
        with open(preds_path, "a", encoding="utf-8") as f:
            for it in todo:
                try:
                    rec = {"key": it.key, "prediction": backend.answer(it.image, it.prompt, max_tokens)}
                except ItemError as e:
                    rec = {"key": it.key, "prediction": "", "error": str(e)}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                done[it.key] = rec
                bar.update(1)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start

    records = [score_item(it, dataset.kind, done[it.key]["prediction"], done[it.key].get("error"))
               for it in dataset.items]
    report = build_report(dataset, records, backend.describe(), settings, elapsed)
    report["answered_now"] = len(todo)
    report["resumed"] = len(dataset.items) - len(todo)
    report["files"] = {"report": str(report_path), "predictions": str(preds_path),
                       "chart": str(chart_path) if chart else None}
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, report_path)
    if chart:
        from .report import write_chart
        write_chart(report, chart_path)
    return report
