"""Smoke test of the benchmark: the tiny workloads (LLaVA and Qwen2.5-VL), one repeat, transformers as
the only peer, end to end through `foveal bench`; the table must have every engine row and every
figure column. No timing is asserted (figures from a test machine mean nothing)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from foveal.cli import main

pytest.importorskip("transformers")

COLUMNS = ["engine", "image tokens", "preprocess ms", "encode ms/image", "prefill tok/s", "TTFT ms", "decode tok/s",
           "peak RSS MiB", "decode GB/s", "% of bandwidth"]
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
    assert all(table[row][0] == "64" for row in ROWS)
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["rows"]) == set(ROWS) and data["rows"]["foveal bf16"]["generated"] == 8


def test_bench_bad_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--workload", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--peers", "ollama"])
    assert "--peers 'ollama'" in capsys.readouterr().err


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
QWEN_ROWS = ["foveal bf16", "foveal int8", "transformers bf16", "transformers fp32"]


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCHMARKS))
    import engines
    import workloads
    yield workloads, engines
    sys.path.remove(str(BENCHMARKS))


def test_qwen_vl_tiny_workload_is_what_transformers_saves(tmp_path, bench_modules):
    """The tiny Qwen2.5-VL folder loads into transformers with no missing or unexpected tensor, and
    transformers' own processor pieces give the prompt foveal's processor gives."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    workloads, engines = bench_modules
    folder = workloads.build("qwen2.5-vl-tiny", tmp_path)
    image = workloads.make_image(tmp_path / "image.png", workloads.image_size("qwen2.5-vl-tiny"))
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16,
                                                                     output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.vision_config.fullatt_block_indexes == [1, 3] and model.config.vision_config.window_size == 112
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    ids, n_image = workloads.prompt_ids(folder, image)
    assert n_image == 1230              # 1280x960 under HF's default budget: resized to 1148x840
    _, image_processor, tokenizer = engines.hf_qwen_vl_pieces(folder)
    px = engines.hf_qwen_vl_pixels(image_processor, image)
    assert px["image_grid_thw"].tolist() == [[1, 60, 82]]
    hf_ids, mm = engines.hf_qwen_vl_ids(tokenizer, n_image)
    assert hf_ids[0].tolist() == ids and int(mm.sum()) == n_image
    assert ids[:1] == [151644] and ids.count(151655) == n_image     # <|im_start|>, <|image_pad|> at Qwen's ids
    assert workloads.build("qwen2.5-vl-tiny", tmp_path) == folder   # reused, not rewritten


def test_bench_qwen_vl_tiny_end_to_end(tmp_path):
    out = tmp_path / "results.md"
    assert main(["bench", "--workload", "qwen2.5-vl-tiny", "--repeats", "1", "--warmup", "0", "--foveal", "bf16,int8",
                 "--peers", "transformers", "--decode-tokens", "4", "--bandwidth-mib", "64",
                 "--cache-dir", str(tmp_path / "models"), "--out", str(out)]) == 0
    text = out.read_text()
    table = _table(text, "engine")
    assert table["engine"] == COLUMNS[1:]
    assert [r for r in table if r != "engine"] == QWEN_ROWS
    for row in QWEN_ROWS:
        cells = table[row]
        assert cells[0] == "1230"       # every engine gave the image the same count
        assert all(c != "-" for c in cells), (row, cells)
    assert re.search(r"1 image \(1230 image tokens\) \+ question = 1302 prompt tokens", text)
    assert "bench-image-1280x960.png" in " ".join(p.name for p in (tmp_path / "models").iterdir())
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["workload"] == "qwen2.5-vl-tiny" and set(data["rows"]) == set(QWEN_ROWS)
    for row in data["rows"].values():
        assert row["generated"] == 4 and row["prompt_tokens"] == 1302 and row["image_tokens"] == 1230
        assert {"encode_ms", "preprocess_ms", "prefill_tps", "decode_tps", "peak_rss_mib"} <= set(row)
