"""Reports for people: the printed table, the PNG chart, and two reports side by side.

Design decisions:
- Metric values are stored as fractions and shown as percentages (two decimals), counts as
  integers; every table lists overall first, then per type, then per category.
- The chart plots the run's primary metric (VQA accuracy, exact match, POPE F1, MC accuracy or
  circular accuracy) per type and per category, with the overall value as a dashed line;
  matplotlib runs headless (Agg) and writes no timestamp, so a chart of the same report is the
  same file.
- `--compare A B` refuses reports of different kinds of task (their metrics mean different
  things) and warns when the datasets differ; deltas are B - A in percentage points.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import EvalConfigError, EvalDataError, EvalDataNotFoundError
from .metrics import METRICS

COUNT_FIELDS = ("count", "errors")


def load_report(path) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalDataNotFoundError(f"report {str(path)!r} does not exist")
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalDataError(f"report {p} is not valid JSON: {e}") from None
    if not isinstance(report, dict) or "foveal_eval" not in report or "overall" not in report:
        raise EvalDataError(f"{p} is not a foveal eval report")
    return report


def _metrics(report: dict) -> list[str]:
    kind = report["dataset"]["kind"]
    names = [m for m in METRICS[kind] if m in report["overall"]]
    primary = report.get("primary_metric")
    return [primary] + [m for m in names if m != primary] if primary in names else names


def _rows(report: dict):
    yield "overall", "", report["overall"]
    for section, label in (("per_type", "type"), ("per_category", "category")):
        groups = report.get(section, {})
        if len(groups) > 1:                  # a single group would repeat the overall row
            for name, row in groups.items():
                yield label, name, row


def _pct(v) -> str:
    return f"{100 * v:.2f}" if isinstance(v, (int, float)) else "-"


def _title(report: dict) -> str:
    b = report.get("backend", {})
    who = b.get("name") or b.get("model") or "?"
    if b.get("kind") in ("openai", "ollama"):
        who = f"{b.get('model')} via {b['kind']} at {b.get('endpoint')}"
    d = report["dataset"]
    return f"{d['name']} ({d['format']}, {d['items']} items) - {who}"


def format_table(report: dict) -> str:
    metrics = _metrics(report)
    rows = list(_rows(report))
    width = max(12, *(len(f"{g} {n}".strip()) for g, n, _ in rows)) + 2
    cols = [max(len(m), 6) + 3 for m in metrics]
    head = f"{'':<{width}}{'count':>7}" + "".join(f"{m:>{c}}" for m, c in zip(metrics, cols))
    lines = [_title(report), head, "-" * len(head)]
    for group, name, row in rows:
        label = f"{group} {name}".strip() if group != "overall" else "overall"
        lines.append(f"{label:<{width}}{row.get('count', 0):>7}" + "".join(f"{_pct(row.get(m)):>{c}}" for m, c in zip(metrics, cols)))
    errors = report["overall"].get("errors", 0)
    lines.append(f"(values in %; primary metric: {report.get('primary_metric')}"
                 + (f"; {errors} item(s) failed and count as wrong" if errors else "") + ")")
    return "\n".join(lines)


def write_chart(report: dict, path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["primary_metric"]
    sections = [(title, groups) for title, groups in (("per type", report.get("per_type", {})),
                                                      ("per category", report.get("per_category", {})))
                if len(groups) > 1]
    if not sections:
        sections = [("overall", {"overall": report["overall"]})]
    fig, axes = plt.subplots(1, len(sections), figsize=(5 + 3 * len(sections), 4.5), squeeze=False)
    overall = 100 * report["overall"].get(metric, 0.0)
    for ax, (title, groups) in zip(axes[0], sections):
        names = list(groups)
        values = [100 * groups[n].get(metric, 0.0) for n in names]
        bars = ax.bar(range(len(names)), values, color="#4C72B0")
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
        ax.axhline(overall, color="#C44E52", linestyle="--", linewidth=1, label=f"overall {overall:.1f}")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def compare_reports(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    ka, kb = a["dataset"]["kind"], b["dataset"]["kind"]
    if ka != kb:
        raise EvalConfigError(f"cannot compare a {ka} report with a {kb} report: their metrics differ")
    lines = [f"A: {names[0]}: {_title(a)}", f"B: {names[1]}: {_title(b)}"]
    if a["dataset"].get("path") != b["dataset"].get("path") or a["overall"]["count"] != b["overall"]["count"]:
        lines.append("warning: the reports cover different datasets or item counts; deltas compare unlike things")
    metrics = [m for m in _metrics(a) if m in b["overall"]]
    rows_a = {(g, n): r for g, n, r in _rows(a)}
    rows_b = {(g, n): r for g, n, r in _rows(b)}
    keys = list(rows_a) + [k for k in rows_b if k not in rows_a]
    width = max(12, *(len(f"{g} {n}".strip()) for g, n in keys)) + 2
    head = f"{'':<{width}}{'n A':>6}{'n B':>6}" + "".join(f"{m + ' A':>16}{'B':>8}{'delta':>8}" for m in metrics)
    lines += [head, "-" * len(head)]
    for key in keys:
        ra, rb = rows_a.get(key, {}), rows_b.get(key, {})
        label = "overall" if key[0] == "overall" else f"{key[0]} {key[1]}"
        cells = ""
        for m in metrics:
            va, vb = ra.get(m), rb.get(m)
            delta = f"{100 * (vb - va):+.2f}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else "-"
            cells += f"{_pct(va):>16}{_pct(vb):>8}{delta:>8}"
        lines.append(f"{label:<{width}}{ra.get('count', '-'):>6}{rb.get('count', '-'):>6}" + cells)
    lines.append("(values in %; delta = B - A in percentage points)")
    return "\n".join(lines)
