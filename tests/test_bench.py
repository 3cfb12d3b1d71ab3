"""Smoke test of the benchmark: the tiny workload, one repeat, transformers as the only peer, end
to end through `foveal bench`; the table must have every engine row and every figure column.
No timing is asserted (figures from a test machine mean nothing)."""

from __future__ import annotations

import json
import re

import pytest

from foveal.cli import main

pytest.importorskip("transformers")

COLUMNS = ["engine", "preprocess ms", "encode ms/image", "prefill tok/s", "TTFT ms", "decode tok/s", "peak RSS MiB",
           "decode GB/s", "% of bandwidth"]
ROWS = ["foveal bf16", "foveal bf16 compiled", "foveal int8", "foveal int8 compiled", "foveal int4",
        "foveal int4 compiled", "transformers bf16", "transformers fp32"]


def _table(text: str, first_cell: str) -> dict[str, list[str]]:
    """The markdown table whose header starts with first_cell: {first cell: other cells}."""
    for block in text.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines and lines[0].startswith(f"| {first_cell} |"):
            rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if not ln.startswith("|---")]
            return {r[0]: r[1:] for r in rows}
    raise AssertionError(f"no table starting with {first_cell!r} in:\n{text}")


def test_bench_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "results.md"
    assert main(["bench", "--workload", "tiny", "--repeats", "1", "--warmup", "0", "--peers", "transformers",
                 "--decode-tokens", "8", "--bandwidth-mib", "64", "--cache-dir", str(tmp_path / "models"),
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    table = _table(text, "engine")
    assert table["engine"] == COLUMNS[1:]
    assert [r for r in table if r != "engine"] == ROWS
    for row in ROWS:
        cells = table[row]
        assert len(cells) == len(COLUMNS) - 1
        decode, rss = cells[COLUMNS.index("decode tok/s") - 1], cells[COLUMNS.index("peak RSS MiB") - 1]
        assert float(decode) > 0 and float(rss) > 100
        assert re.fullmatch(r"\d+%", cells[-1])
    ratios = _table(text, "foveal vs peer")
    assert ratios["foveal vs peer"] == ["encode", "prefill", "TTFT", "decode", "peak RSS"]
    assert "foveal int4 vs transformers fp32" in ratios
    assert "llama.cpp: not asked for (--peers)" in text
    assert "machine:" in text and "torch " in text and "memory bandwidth" in text
    assert "65 prompt tokens" not in text and re.search(r"1 image \(64 image tokens\) \+ question = \d+ prompt", text)
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["rows"]) == set(ROWS) and data["rows"]["foveal bf16"]["generated"] == 8


def test_bench_bad_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--workload", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--peers", "ollama"])
    assert "--peers 'ollama'" in capsys.readouterr().err
