"""The real `foveal` command in subprocesses, against a tiny random model written to disk.

One fixture starts every command of the module side by side (a thread pool of subprocesses), so
the ~2 s of imports each one costs is paid in parallel; each test then asserts on its result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

import foveal
from foveal.bundled import ASSET_DIR, build_random_model

SCRIPT = Path(sys.executable).parent / "foveal"
FOVEAL = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "foveal.cli"]
STATS = re.compile(r"^\[(\d+) prompt tokens \((\d+) image, \d+ cached\), (\d+) generated \| preprocess \d+ ms, "
                   r"encode \d+ ms, prefill \d+ ms \(\d+ tok/s\), decode \d+ ms \([\d.]+ tok/s\)\]$", re.M)
QUESTION = "What is in this picture?"
CHAT_SCRIPT = "\n".join(["/image missing.png", "/image red.png", "What colour is it?", "Are you sure?", "/clear",
                         "Hello again.", "/help", "/exit", "never read"]) + "\n"


SCHEMA = {"type": "object", "properties": {"pick": {"enum": ["left", "right"]}}, "required": ["pick"],
          "additionalProperties": False}


def _commands(model: str) -> dict[str, tuple[list[str], str | None]]:
    """name -> (arguments, stdin)."""
    run = ["run", model, "--dtype", "float32"]
    return {
        "run": (run + ["--image", "red.png", QUESTION, "--max-tokens", "5", "--stats", "--seed", "7",
                       "--temperature", "1.0", "--top-k", "50"], None),
        "version": (["--version"], None),
        "info": (["info", model], None),
        "info-json": (["info", model, "--json", "--dtype", "float32"], None),
        "chat": (["chat", model, "--max-tokens", "3", "--stats", "--dtype", "float32"], CHAT_SCRIPT),
        # bad input: exit 1, one `error:` line
        "missing-model": (["run", "no-such-model-folder", "Hi"], None),
        "not-an-image": (run + ["--image", "notes.png", QUESTION], None),
        "missing-image": (run + ["--image", "missing.png", QUESTION], None),
        "bad-dtype": (["run", model, "--dtype", "float8", "Hi"], None),
        "negative-temperature": (run + ["--temperature", "-1", "Hi"], None),
        # checked before any model loads: this one names a model that does not exist
        "top-p-before-load": (["run", "no-such-model-folder", "--top-p", "1.5", "Hi"], None),
        "images-overflow-context": (["run", "--model", model, "--ctx", "100", "--image", "red.png", "--image",
                                     "red.png", QUESTION], None),
        "more-placeholders-than-images": (run + ["--image", "red.png", "<image> and <image>?"], None),
        "bad-device": (run + ["--device", "tpu", "Hi"], None),
        "no-model": (["run", "Hi"], None),
        "format-schema": (run + ["--format", "schema.json", "--max-tokens", "40", "Pick one"], None),
        "format-missing": (run + ["--format", "nowhere.json", "Hi"], None),
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    build_random_model(d / "tiny")
    Image.new("RGB", (50, 30), (220, 20, 20)).save(d / "red.png")
    (d / "notes.png").write_text("these are notes, not a PNG\n")
    (d / "schema.json").write_text(json.dumps(SCHEMA))
    return d


@pytest.fixture(scope="module")
def results(workdir) -> dict[str, subprocess.CompletedProcess]:
    commands = _commands("tiny")

    def go(item):
        name, (args, stdin) = item
        return name, subprocess.run(FOVEAL + args, cwd=workdir, input=stdin or "", capture_output=True,
                                    text=True, timeout=120)
    with ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1)) as pool:
        return dict(pool.map(go, commands.items()))


def assert_one_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tensor_counts(model: Path) -> dict[str, int]:
    counts = {"vision": 0, "projector": 0, "language_model": 0}
    with safe_open(model / "model.safetensors", "pt") as f:
        for name in f.keys():
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            part = ("vision" if name.startswith("vision_tower.") else
                    "projector" if name.startswith("multi_modal_projector.") else "language_model")
            counts[part] += n
    return counts


# ---- happy paths ------------------------------------------------------------------------
def test_run_answers_and_reports_stats(results, workdir):
    r = results["run"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and r.stdout.strip()
    m = STATS.search(r.stderr)
    assert m, r.stderr
    prompt, image, generated = map(int, m.groups())
    assert image == 64 and prompt > image and 1 <= generated <= 5
    assert STATS.search(r.stdout) is None                 # stats stay off stdout
    # the same answer as the Python API gives for the same request and seed (float32)
    vlm = foveal.load(workdir / "tiny", dtype="float32")
    result = vlm.generate([foveal.user(QUESTION, images=[workdir / "red.png"])], max_tokens=5, seed=7,
                          temperature=1.0, top_k=50)
    assert r.stdout == result.text + "\n"
    assert generated == result.stats.generated_tokens


def test_version(results):
    r = results["version"]
    assert r.returncode == 0 and r.stdout.strip() == f"foveal {foveal.__version__}"


def test_info(results, workdir):
    r = results["info"]
    assert r.returncode == 0, r.stderr
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in r.stdout.strip().splitlines())
    assert rows["architecture"].startswith("LlavaForConditionalGeneration")
    assert rows["language model"] == "llama" and rows["vision tower"] == "clip_vision_model"
    assert rows["projector"] == "mlp2x_gelu"
    assert re.fullmatch(r"[\d.]+K total: vision [\d.]+K, projector [\d.]+K, language model [\d.]+K",
                        rows["parameters"]), rows["parameters"]
    assert rows["dtype"] in ("bfloat16", "float32")
    assert rows["image tokens/image"] == "64 (64 px)"
    assert rows["context length"] == "2048"
    assert re.fullmatch(r"[\d.]+ MiB", rows["weight memory"])


def test_info_json(results, workdir):
    r = results["info-json"]
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    expected = tensor_counts(workdir / "tiny")
    assert {k: d["parameters"][k] for k in expected} == expected
    assert d["parameters"]["total"] == sum(expected.values())
    assert d["dtype"] == "float32"
    assert 0 <= d["weight_bytes"] - 4 * sum(expected.values()) <= 1024     # + the RoPE table, a non-persistent buffer
    assert d["architecture"] == "LlavaForConditionalGeneration" and d["layout"] == "llava-hf"
    assert d["language_model"] == "llama" and d["vision_tower"] == "clip_vision_model"
    assert d["image_tokens_per_image"] == 64 and d["image_size"] == 64 and d["context_length"] == 2048


def test_chat_through_stdin(results):
    r = results["chat"]
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("error: ") and "missing.png" in out[0]       # a bad /image is refused, chat goes on
    assert out[1] == "(image red.png attached to your next message)"
    assert "(conversation cleared)" in out
    assert "commands: /image PATH, /clear, /exit" in out                  # unknown command: help
    stats = [tuple(map(int, m)) for m in STATS.findall(r.stderr)]
    assert len(stats) == 3                                                # three questions, /exit stops it
    (p1, i1, g1), (p2, i2, g2), (p3, i3, g3) = stats
    assert i1 == 64 and i2 == 64                   # the image stays in context for the second question
    assert p2 > p1 + g1 - 1                        # ... and so do the first question and its answer
    assert i3 == 0 and p3 < p1                     # /clear forgot the image and the history


# ---- bad input -----------------------------------------------------------------------------
def test_missing_model_folder(results):
    assert_one_error(results["missing-model"], "no-such-model-folder", "not found")
    assert results["missing-model"].stdout == ""


def test_not_an_image(results):
    assert_one_error(results["not-an-image"], "notes.png", "not an image")


def test_missing_image(results):
    assert_one_error(results["missing-image"], "missing.png")


def test_bad_dtype(results):
    assert_one_error(results["bad-dtype"], "float8", "float32", "bfloat16")


def test_bad_sampling_values(results):
    assert_one_error(results["negative-temperature"], "temperature", "-1")
    assert_one_error(results["top-p-before-load"], "top_p", "1.5")      # before the (missing) model is looked up


def test_images_overflow_context(results):
    line = assert_one_error(results["images-overflow-context"], "context holds 100")
    needed = int(re.search(r"needs (\d+) tokens", line).group(1))
    assert needed > 2 * 64


def test_more_placeholders_than_images(results):
    assert_one_error(results["more-placeholders-than-images"], "3 image placeholder", "1 image")


def test_bad_device(results):
    assert_one_error(results["bad-device"], "tpu", "cpu", "cuda")


def test_no_model_and_no_bundled_model(results):
    r = results["no-model"]
    if (ASSET_DIR / "config.json").exists():       # once the bundled model ships, `foveal run PROMPT` uses it
        assert r.returncode == 0, r.stderr
        return
    assert_one_error(r, "no model was named", "no bundled model", "python -m foveal.bundled")




def test_run_format_schema_constrains_the_answer(results):
    r = results["format-schema"]
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) in ({"pick": "left"}, {"pick": "right"})


def test_run_format_missing_schema_file(results):
    assert_one_error(results["format-missing"], "nowhere.json", "schema file")
