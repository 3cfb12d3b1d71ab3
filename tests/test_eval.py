"""foveal eval: metric values against the official definitions (hand-made cases), every input
format through the runner with a tiny random local model (random weights answer noise, so
those tests check counts, report fields, files and resume, never accuracy), scored runs with
hand-made answers from a scripted backend, the endpoint backends over real HTTP (foveal's own
server with the official wire formats, and a stdlib server that answers fixed text), and bad
input."""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import foveal
from foveal.bundled import build_random_model
from foveal.cli import main as cli_main
from foveal.data import write_dataset
from foveal.errors import FovealError
from foveal.eval import (EndpointError, EvalConfigError, EvalDataError, EvalDataNotFoundError, LocalBackend,
                         ResumeMismatchError, compare_reports, evaluate, exact_match, extract_choice,
                         format_table, load_dataset, load_report, normalize_answer, pope_metrics, pope_parse,
                         rotate_options, run_eval, vqa_accuracy)
from foveal.eval.backends import ItemError, endpoint_backend
from foveal.eval.metrics import breakdown, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- metrics: VQA normalisation and accuracy ---------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                      # number words -> digits, lower case
    ("a dog.", "dog"),                 # article dropped, final period stripped
    ("The  Red ", "red"),
    ("none", "0"),                     # in the official manualMap
    ("dont", "don’t"),                 # contractions table (curly apostrophe, as in vqaEval.py)
    ("don't", "don t"),                # "'" is punctuation with no space beside it: becomes a space
    ("1,000", "1000"),                 # a comma between digits: every punctuation mark is deleted
    ("red, blue", "red blue"),         # a comma before a space is deleted
    ("left/right", "left right"),      # no space beside "/": it becomes a space
    ("3.5", "3.5"),                    # a period followed by a digit stays
    ("yes.", "yes"),
    ("x-ray", "x-ray"),                # "-" is not in the official punctuation list
])
def test_normalize_answer_official_rules(raw, expected):
    assert normalize_answer(raw) == expected


def _official_vqa_acc(pred: str, answers: list[str]) -> float:
    """The definition written out: mean over the 10-choose-9 subsets of min(#matches / 3, 1)."""
    subsets = list(itertools.combinations(range(len(answers)), len(answers) - 1))
    return sum(min(1.0, sum(answers[i] == pred for i in s) / 3) for s in subsets) / len(subsets)


@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, 0.3),      # left out: the match (1 subset) -> 0; any other (9) -> 1/3: 9/3/10
    (2, 0.6),      # left out: a match (2) -> 1/3; any other (8) -> 2/3: (2/3 + 16/3) / 10
    (3, 0.9),      # left out: a match (3) -> 2/3; any other (7) -> 1:   (2 + 7) / 10
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_subset_average(matches, expected):
    answers = ["2"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_accuracy("two", answers) == pytest.approx(expected)
    assert vqa_accuracy("2", answers) == pytest.approx(_official_vqa_acc("2", answers))


def test_vqa_accuracy_normalises_both_sides_and_short_reference_lists():
    assert vqa_accuracy("A dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["Two"] * 10) == 1.0          # references are normalised too
    assert vqa_accuracy("dog", ["dog"]) == 1.0               # one reference: exact match
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    assert vqa_accuracy("dog", ["dog", "dog"]) == 1.0        # n < 4: a unanimous answer still scores 1
    with pytest.raises(ValueError):
        vqa_accuracy("dog", [])


def test_exact_match_is_normalised():
    assert exact_match("The circle.", "circle") == 1.0
    assert exact_match("Three", "3") == 1.0
    assert exact_match("a red circle", "circle") == 0.0


# ---- metrics: POPE -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("yes, there is a cat.", "yes"), ("No", "no"), ("no.", "no"),
    ("No, there is not.", "no"), ("There is not a cat in the image.", "no"),
    ("Yes. No other animals.", "yes"),           # only the first sentence counts
    ("I see a dog", "yes"),                      # anything without no/not is a yes (POPE's rule)
    ("", "yes"),
])
def test_pope_parse(text, parsed):
    assert pope_parse(text) == parsed


def test_pope_metrics_small_table():
    labels = ["yes"] * 4 + ["no"] * 6
    preds = ["yes", "yes", "yes", "no", "yes", "yes", "no", "no", "no", "no"]   # TP 3, FN 1, FP 2, TN 4
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 4)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(0.6)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert m["yes_ratio"] == pytest.approx(0.5)
    none = pope_metrics(["no", "no"], ["yes", "no"])       # no positive prediction: precision 0, no crash
    assert none["precision"] == 0.0 and none["f1"] == 0.0


# ---- metrics: multiple choice ------------------------------------------------------------------------

OPTIONS = {"A": "cat", "B": "dog", "C": "red", "D": "dark red"}


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("B) dog", "B"), ("The answer is (B).", "B"),
    ("Answer: C", "C"), ("I think D is right", "D"),
    ("It is a dog.", "B"),                 # option text
    ("dark red", "D"),                     # "red" is inside "dark red": the longer text wins
    ("A cat sits on the mat", "A"),        # leading article, but the option text decides
    ("A or B", None), ("", None), ("I cannot tell", None),
    ("E", None),                           # not an option
])
def test_extract_choice(text, letter):
    assert extract_choice(text, OPTIONS) == letter


def test_rotate_options_moves_answer_with_its_text():
    shown, answer = rotate_options({"A": "w", "B": "x", "C": "y", "D": "z"}, "C", 1)
    assert shown == {"A": "x", "B": "y", "C": "z", "D": "w"} and answer == "B"
    for k in range(4):
        shown, answer = rotate_options(OPTIONS, "B", k)
        assert shown[answer] == "dog"


def test_circular_accuracy_needs_every_rotation():
    records = [{"group": "q1", "rotation": k, "correct": True, "extracted": "A", "type": "t", "category": "c"}
               for k in range(4)]
    records += [{"group": "q2", "rotation": k, "correct": k != 2, "extracted": "A" if k != 3 else None,
                 "type": "t", "category": "d"} for k in range(4)]
    row = summarize("mc", records)
    assert row["accuracy"] == pytest.approx(7 / 8)
    assert row["circular_accuracy"] == pytest.approx(0.5)
    assert row["questions"] == 2 and row["unparsed"] == pytest.approx(1 / 8)
    per = breakdown("mc", records, "category")
    assert per["c"]["circular_accuracy"] == 1.0 and per["d"]["circular_accuracy"] == 0.0


def test_per_type_breakdown():
    records = [{"type": "count", "category": "all", "vqa_accuracy": 1.0, "exact_match": 1.0},
               {"type": "count", "category": "all", "vqa_accuracy": 0.6, "exact_match": 0.0},
               {"type": "color", "category": "all", "vqa_accuracy": 0.0, "exact_match": 0.0}]
    per = breakdown("vqa", records, "type")
    assert per["count"] == {"count": 2, "vqa_accuracy": pytest.approx(0.8), "exact_match": 0.5, "errors": 0}
    assert per["color"]["count"] == 1 and per["color"]["vqa_accuracy"] == 0.0
    assert summarize("vqa", records)["vqa_accuracy"] == pytest.approx(1.6 / 3)


# ---- fixtures: files in every format -------------------------------------------------------------------

def png(color=(200, 30, 30), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic world's VQAv2, POPE and LLaVA files (2 scenes)."""
    return write_dataset(tmp_path_factory.mktemp("world"), n=2, seed=7, formats=("vqa", "pope", "instruct"))


@pytest.fixture(scope="module")
def textvqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("textvqa")
    (root / "imgs").mkdir()
    for image_id, color in (("0a1b", (0, 0, 0)), ("0c2d", (255, 255, 255))):
        (root / "imgs" / f"{image_id}.jpg").write_bytes(png(color))    # a PNG named .jpg, as found in the wild
    data = {"dataset_name": "textvqa", "dataset_type": "val", "data": [
        {"question_id": 11, "image_id": "0a1b", "question": "what does the sign say?",
         "answers": ["stop"] * 7 + ["STOP!"] * 2 + ["go"]},
        {"question_id": 12, "image_id": "0c2d", "question": "what number is on the bus?",
         "answers": ["12"] * 10},
    ]}
    path = root / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps(data))
    return path, root / "imgs"


MMBENCH_ROWS = [
    {"index": "0", "question": "What animal is shown?", "hint": "", "A": "cat", "B": "dog", "C": "cow", "D": "pig",
     "answer": "B", "category": "object_localization", "l2-category": "perception"},
    {"index": "1", "question": "Which colour dominates?", "hint": "Look at the background.", "A": "red", "B": "blue",
     "C": "", "D": "", "answer": "A", "category": "attribute_recognition", "l2-category": "perception"},
    {"index": "2", "question": "How many objects?", "hint": "nan", "A": "1", "B": "2", "C": "3", "D": "4",
     "answer": "C", "category": "counting", "l2-category": "reasoning"},
]


def write_mmbench(path: Path, rows=MMBENCH_ROWS, with_answer=True) -> Path:
    columns = ["index", "question", "hint", "A", "B", "C", "D"] + (["answer"] if with_answer else []) + \
              ["category", "image", "l2-category"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**r, "image": base64.b64encode(png((40 * i, 90, 160))).decode()})
    return path


@pytest.fixture(scope="module")
def mmbench(tmp_path_factory):
    return write_mmbench(tmp_path_factory.mktemp("mmb") / "MMBench_DEV_EN.tsv")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def vlm(model_dir):
    return foveal.load(model_dir, dtype="float32")


class CountingBackend(LocalBackend):
    def __init__(self, vlm):
        super().__init__(vlm)
        self.asked: list[str] = []

    def answer(self, image, prompt, max_tokens):
        self.asked.append(prompt)
        return super().answer(image, prompt, max_tokens)


class ScriptedBackend:
    """Answers from a function of the item's prompt: known predictions for exact scores."""
    kind = "scripted"
    short_name = "scripted"

    def __init__(self, reply, sees_image=False):
        self.reply, self.sees_image = reply, sees_image
        self.calls = 0

    def describe(self):
        return {"kind": self.kind, "model": "script"}

    identity = describe

    def answer(self, image, prompt, max_tokens):
        self.calls += 1
        return self.reply(image, prompt) if self.sees_image else self.reply(prompt)

    def close(self):
        pass


# ---- loading each format ----------------------------------------------------------------------------------

def test_load_each_format(world, textvqa, mmbench, tmp_path):
    vqa = load_dataset(world["vqa_questions"])
    assert vqa.format == "vqav2" and vqa.annotations == world["vqa_annotations"].resolve()
    assert vqa.items[0].prompt.endswith("\nAnswer the question using a single word or phrase.")
    assert len(vqa.items[0].answers) == 10 and Path(vqa.items[0].image).is_file()
    pope = load_dataset(world["pope"], limit=3)
    assert pope.format == "pope" and len(pope.items) == 3 and pope.items[0].label in ("yes", "no")
    llava = load_dataset(world["instruct"])
    assert llava.format == "llava" and all("<image>" not in it.prompt for it in llava.items)
    tv = load_dataset(textvqa[0], images=textvqa[1])
    assert tv.format == "textvqa" and [it.key for it in tv.items] == ["11", "12"]
    mc = load_dataset(mmbench)
    assert mc.format == "mmbench" and len(mc.items) == 3 and isinstance(mc.items[0].image, bytes)
    assert mc.items[1].options == {"A": "red", "B": "blue"}                 # empty C, D dropped
    assert mc.items[1].prompt == ("Look at the background.\nWhich colour dominates?\nA. red\nB. blue\n"
                                  "Answer with the option's letter from the given choices directly.")
    assert mc.items[2].prompt.startswith("How many objects?\nA. 1")          # "nan" hint ignored
    circ = load_dataset(mmbench, circular=True)
    assert len(circ.items) == 4 + 2 + 4 and circ.questions == 3
    assert {it.key for it in circ.items} >= {"0", "0@1", "0@3", "1@1"}
    # POPE's own files are JSON lines named .json, with no category: the file name is the category
    pope_json = tmp_path / "coco_pope_adversarial.json"
    pope_json.write_text(Path(world["pope"]).read_text().replace('"category": ', '"cat": '))
    d = load_dataset(pope_json, images=Path(world["pope"]).parent)
    assert d.format == "pope" and {it.category for it in d.items} == {"coco_pope_adversarial"}


def test_vqav2_images_by_coco_name(tmp_path):
    (tmp_path / "val2014").mkdir()
    (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(png())
    qs = {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "Is it red?", "question_id": 420}]}
    anns = {"annotations": [{"question_id": 420, "image_id": 42, "question_type": "is it", "answer_type": "yes/no",
                             "multiple_choice_answer": "yes",
                             "answers": [{"answer": "yes", "answer_id": i} for i in range(1, 11)]}]}
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(qs))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(anns))
    d = load_dataset(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", images=tmp_path / "val2014")
    assert d.items[0].image.endswith("COCO_val2014_000000000042.jpg")
    assert d.items[0].type == "is it" and d.items[0].category == "yes/no"


# ---- the runner with the random local model -----------------------------------------------------------

def test_runner_vqa_report_files_and_resume(vlm, world, tmp_path):
    out = tmp_path / "run.json"
    first = CountingBackend(vlm)
    report = run_eval(load_dataset(world["vqa_questions"], limit=2), first, out, max_tokens=3)
    assert len(first.asked) == 2 and report["resumed"] == 0
    assert report["foveal_eval"] == 1 and report["date"]
    assert report["dataset"]["format"] == "vqav2" and report["dataset"]["items"] == 2
    assert report["backend"]["kind"] == "local" and report["backend"]["model"] == str(vlm.path)
    assert report["primary_metric"] == "vqa_accuracy" and report["overall"]["count"] == 2
    assert set(report["overall"]) >= {"vqa_accuracy", "exact_match", "count", "errors"}
    assert sum(r["count"] for r in report["per_type"].values()) == 2
    assert sum(r["count"] for r in report["per_category"].values()) == 2
    assert json.loads(out.read_text())["overall"] == report["overall"]
    assert (tmp_path / "run.png").read_bytes().startswith(PNG_MAGIC)
    lines = (tmp_path / "run.predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "header" in json.loads(lines[0])

    # a longer run of the same command answers only what is new
    second = CountingBackend(vlm)
    dataset = load_dataset(world["vqa_questions"], limit=5)
    report = run_eval(dataset, second, out, max_tokens=3)
    assert len(second.asked) == 3 and report["resumed"] == 2 and report["overall"]["count"] == 5
    assert second.asked == [it.prompt for it in dataset.items[2:]]

    # a torn last line (a crash mid-write) is cut off and that item asked again
    preds = tmp_path / "run.predictions.jsonl"
    preds.write_text(preds.read_text() + '{"key": "torn", "predic')
    third = CountingBackend(vlm)
    report = run_eval(load_dataset(world["vqa_questions"], limit=6), third, out, max_tokens=3)
    assert len(third.asked) == 1 and report["overall"]["count"] == 6
    assert all(json.loads(line) for line in preds.read_text().splitlines())

    # another run's settings are refused, unless restarted
    with pytest.raises(ResumeMismatchError, match="max_tokens"):
        run_eval(dataset, CountingBackend(vlm), out, max_tokens=4)
    fresh = CountingBackend(vlm)
    report = run_eval(load_dataset(world["vqa_questions"], limit=2), fresh, out, max_tokens=4, restart=True,
                      chart=False)
    assert len(fresh.asked) == 2 and report["resumed"] == 0


def test_runner_every_format_with_local_model(vlm, world, textvqa, mmbench, tmp_path):
    cases = [
        (load_dataset(world["pope"], limit=3), "f1", {"accuracy", "precision", "recall", "f1", "yes_ratio"}),
        (load_dataset(world["instruct"], limit=2), "exact_match", {"exact_match"}),
        (load_dataset(textvqa[0], images=textvqa[1]), "vqa_accuracy", {"vqa_accuracy", "exact_match"}),
        (load_dataset(mmbench, limit=2, circular=True), "circular_accuracy", {"accuracy", "circular_accuracy"}),
    ]
    for dataset, primary, metrics in cases:
        report = run_eval(dataset, LocalBackend(vlm), tmp_path / f"{dataset.format}.json", max_tokens=2)
        assert report["primary_metric"] == primary, dataset.format
        assert report["overall"]["count"] == len(dataset.items)
        assert metrics <= set(report["overall"])
        assert all(0.0 <= report["overall"][m] <= 1.0 for m in metrics)
        assert (tmp_path / f"{dataset.format}.png").read_bytes().startswith(PNG_MAGIC)
        assert format_table(report).splitlines()[0].startswith(dataset.name)
    assert report["overall"]["questions"] == 2 and report["overall"]["count"] == 6   # 4 + 2 rotations


# ---- scored runs with known answers ---------------------------------------------------------------------

def test_runner_scores_known_answers(world, mmbench, tmp_path):
    vqa = load_dataset(world["vqa_questions"])
    truth = {(it.image, it.prompt): it.answers[0] for it in vqa.items}      # a question may repeat
    wrong = {(it.image, it.prompt) for it in vqa.items[:2]}
    backend = ScriptedBackend(lambda image, p: "wrong" if (image, p) in wrong else f"The {truth[image, p]}.",
                              sees_image=True)
    report = run_eval(vqa, backend, tmp_path / "vqa.json", chart=False)
    n, n_wrong = len(vqa.items), sum((it.image, it.prompt) in wrong for it in vqa.items)
    assert report["overall"]["vqa_accuracy"] == pytest.approx((n - n_wrong) / n)
    assert report["overall"]["exact_match"] == pytest.approx((n - n_wrong) / n)
    first_type = vqa.items[0].type
    members = [it for it in vqa.items if it.type == first_type]
    missed = sum((it.image, it.prompt) in wrong for it in members)
    assert report["per_type"][first_type]["vqa_accuracy"] == pytest.approx((len(members) - missed) / len(members))

    pope = load_dataset(world["pope"])
    report = run_eval(pope, ScriptedBackend(lambda p: "Yes, there is."), tmp_path / "pope.json", chart=False)
    yes = sum(it.label == "yes" for it in pope.items)
    assert report["overall"]["yes_ratio"] == 1.0 and report["overall"]["recall"] == 1.0
    assert report["overall"]["precision"] == pytest.approx(yes / len(pope.items))
    assert set(report["per_category"]) == {it.category for it in pope.items}

    # MMBench circular: question 0 always right (answers its text), question 2 right except when
    # "3" is shown as A (rotation 2), question 1 right.
    def reply(prompt):
        if prompt.startswith("What animal"):
            return "It is a dog."
        if prompt.startswith("Look at"):
            return next(line[0] for line in prompt.splitlines() if line.endswith(". red"))
        correct = next(line[0] for line in prompt.splitlines() if line.endswith(". 3"))
        return "B" if correct == "A" else f"The answer is ({correct})."
    report = run_eval(load_dataset(mmbench, circular=True), ScriptedBackend(reply), tmp_path / "mc.json", chart=False)
    assert report["overall"]["accuracy"] == pytest.approx(9 / 10)
    assert report["overall"]["circular_accuracy"] == pytest.approx(2 / 3)
    assert report["per_category"]["counting"]["circular_accuracy"] == 0.0


def test_item_errors_are_recorded_and_counted_wrong(world, tmp_path):
    def reply(prompt):
        if "How many" in prompt:
            raise ItemError("HTTP 400: image too large")
        return "yes"
    report = run_eval(load_dataset(world["vqa_questions"], limit=4), ScriptedBackend(reply), tmp_path / "r.json",
                      chart=False)
    failed = [json.loads(x) for x in (tmp_path / "r.predictions.jsonl").read_text().splitlines()[1:]]
    n_failed = sum("error" in r for r in failed)
    assert report["overall"]["errors"] == n_failed > 0
    again = ScriptedBackend(lambda p: "yes")          # a resume asks the failed items again, only them
    report = run_eval(load_dataset(world["vqa_questions"], limit=4), again, tmp_path / "r.json", chart=False)
    assert again.calls == n_failed and report["overall"]["errors"] == 0 and report["resumed"] == 4 - n_failed


def test_interrupted_run_resumes_where_it_stopped(world, tmp_path):
    def reply(prompt, stop_after=[3]):
        stop_after[0] -= 1
        if stop_after[0] < 0:
            raise KeyboardInterrupt
        return "yes"
    dataset = load_dataset(world["pope"], limit=6)
    with pytest.raises(KeyboardInterrupt):
        run_eval(dataset, ScriptedBackend(reply), tmp_path / "i.json", chart=False)
    assert not (tmp_path / "i.json").exists()
    assert len((tmp_path / "i.predictions.jsonl").read_text().splitlines()) == 1 + 3
    rest = ScriptedBackend(lambda p: "yes")
    report = run_eval(dataset, rest, tmp_path / "i.json", chart=False)
    assert rest.calls == 3 and report["resumed"] == 3 and report["overall"]["count"] == 6


def test_local_model_unreadable_image_is_an_item_error(vlm, tmp_path):
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "broken.png").write_bytes(png()[:40])          # truncated
    lines = [{"question_id": 1, "image": "broken.png", "text": "Is there a cat?", "label": "no"},
             {"question_id": 2, "image": "ok.png", "text": "Is there a dog?", "label": "yes"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = run_eval(load_dataset(tmp_path / "p.jsonl"), LocalBackend(vlm), tmp_path / "p.json", max_tokens=2,
                      chart=False)
    assert report["overall"]["count"] == 2 and report["overall"]["errors"] == 1
    first = json.loads((tmp_path / "p.predictions.jsonl").read_text().splitlines()[1])
    assert first["key"] == "1" and first["error"]


def test_compare_reports(world, tmp_path, capsys):
    vqa = load_dataset(world["vqa_questions"], limit=6)
    truth = {(it.image, it.prompt): it.answers[0] for it in vqa.items}
    a = run_eval(vqa, ScriptedBackend(lambda p: "no"), tmp_path / "a.json", chart=False)
    b = run_eval(vqa, ScriptedBackend(lambda image, p: truth[image, p], sees_image=True), tmp_path / "b.json", chart=False)
    text = compare_reports(load_report(tmp_path / "a.json"), load_report(tmp_path / "b.json"))
    overall = next(line for line in text.splitlines() if line.startswith("overall"))
    delta = 100 * (b["overall"]["vqa_accuracy"] - a["overall"]["vqa_accuracy"])
    assert f"{delta:+.2f}" in overall
    assert cli_main(["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "delta" in capsys.readouterr().out
    pope = run_eval(load_dataset(world["pope"], limit=2), ScriptedBackend(lambda p: "no"), tmp_path / "p.json",
                    chart=False)
    with pytest.raises(EvalConfigError, match="cannot compare"):
        compare_reports(a, pope)


def test_cli_eval_local(model_dir, world, tmp_path, capsys):
    out = tmp_path / "cli.json"
    rc = cli_main(["eval", str(model_dir), "--data", str(world["pope"]), "--limit", "2", "--max-tokens", "2",
                   "--dtype", "float32", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "f1" in printed and "overall" in printed and str(out) in printed
    report = load_report(out)
    assert report["overall"]["count"] == 2 and (tmp_path / "cli.png").is_file()


# ---- endpoints over real HTTP --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_against_foveal_server_matches_local(vlm, world, tmp_path):
    pytest.importorskip("uvicorn")
    dataset = load_dataset(world["pope"], limit=2)
    local = run_eval(dataset, LocalBackend(vlm), tmp_path / "local.json", max_tokens=3, chart=False)
    expected = [json.loads(x)["prediction"] for x in (tmp_path / "local.predictions.jsonl").read_text().splitlines()[1:]]
    from live_server import LiveServer
    with LiveServer(vlm) as server:
        for api in ("openai", "ollama"):
            report = evaluate(world["pope"], endpoint=server.url, api=api, limit=2, max_tokens=3,
                              out=tmp_path / f"{api}.json", chart=False)     # model: the first the server lists
            assert report["backend"] == {"kind": api, "endpoint": server.url, "model": "tiny"}
            got = [json.loads(x)["prediction"]
                   for x in (tmp_path / f"{api}.predictions.jsonl").read_text().splitlines()[1:]]
            assert got == expected, api        # greedy: same model, same prompt, same answer
            assert report["overall"] == local["overall"]


class FixedAnswerHandler(BaseHTTPRequestHandler):
    """Just enough of /v1/chat/completions, /v1/models, /api/chat and /api/tags: answers "Yes"
    to existence questions and "2" otherwise; a question containing "FAIL400" gets a 400,
    a bearer token other than the expected one a 401."""
    requests: list = []
    token = None

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _auth_ok(self):
        return self.token is None or self.headers.get("Authorization") == f"Bearer {self.token}"

    def do_GET(self):
        if not self._auth_ok():
            return self._send(401, {"error": "bad key"})
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "fixed", "object": "model"}]})
        if self.path == "/api/tags":
            return self._send(200, {"models": [{"name": "fixed:latest", "model": "fixed:latest"}]})
        self._send(404, {"error": "not found"})

    def do_POST(self):
        if not self._auth_ok():
            return self._send(401, {"error": "bad key"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        msg = body["messages"][-1]
        text = msg["content"] if isinstance(msg["content"], str) else \
            next(p["text"] for p in msg["content"] if p["type"] == "text")
        if "FAIL400" in text:
            return self._send(400, {"error": "image too large"})
        answer = "Yes" if text.startswith("Is there") else "2"
        if self.path == "/v1/chat/completions":
            return self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]})
        if self.path == "/api/chat":
            return self._send(200, {"model": body["model"], "message": {"role": "assistant", "content": answer},
                                    "done": True})
        self._send(404, {"error": "not found"})


@pytest.fixture
def fixed_server():
    FixedAnswerHandler.requests = []
    FixedAnswerHandler.token = None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FixedAnswerHandler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_endpoint_wire_formats_and_scores(world, fixed_server, tmp_path):
    pope = load_dataset(world["pope"])
    image = Path(pope.items[0].image).read_bytes()
    for api, path in (("openai", "/v1/chat/completions"), ("ollama", "/api/chat")):
        FixedAnswerHandler.requests = []
        report = evaluate(world["pope"], endpoint=fixed_server + ("/v1" if api == "openai" else ""), api=api,
                          max_tokens=5, out=tmp_path / f"{api}.json", chart=False)
        assert report["overall"]["yes_ratio"] == 1.0
        assert report["overall"]["precision"] == pytest.approx(sum(it.label == "yes" for it in pope.items)
                                                               / len(pope.items))
        sent_path, body = FixedAnswerHandler.requests[0]
        assert sent_path == path and len(FixedAnswerHandler.requests) == len(pope.items)
        if api == "openai":
            assert body["model"] == "fixed" and body["max_tokens"] == 5 and body["temperature"] == 0
            parts = body["messages"][0]["content"]
            uri = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
            assert uri == "data:image/png;base64," + base64.b64encode(image).decode()
            assert next(p["text"] for p in parts if p["type"] == "text") == pope.items[0].prompt
        else:
            assert body["model"] == "fixed:latest" and body["stream"] is False
            assert body["options"] == {"temperature": 0.0, "num_predict": 5}
            assert body["messages"][0]["images"] == [base64.b64encode(image).decode()]
            assert body["messages"][0]["content"] == pope.items[0].prompt

    # answers "2" to every VQA question: exactly the count questions whose answer is 2 score
    vqa = load_dataset(world["vqa_questions"])
    report = evaluate(world["vqa_questions"], endpoint=fixed_server, model="fixed", out=tmp_path / "v.json",
                      chart=False)
    expected = sum(vqa_accuracy("Yes" if it.question.startswith("Is there") else "2", it.answers)
                   for it in vqa.items) / len(vqa.items)
    assert report["overall"]["vqa_accuracy"] == pytest.approx(expected)


def test_endpoint_errors(world, fixed_server, tmp_path):
    pope_lines = Path(world["pope"]).read_text().splitlines()
    rec = json.loads(pope_lines[0])
    rec["text"] = "FAIL400 " + rec["text"]
    bad = tmp_path / "pope_bad.jsonl"
    bad.write_text("\n".join([json.dumps(rec)] + pope_lines[1:3]) + "\n")
    (tmp_path / "images").symlink_to(Path(world["pope"]).parent / "images")
    report = evaluate(bad, endpoint=fixed_server, api="openai", out=tmp_path / "bad.json", chart=False)
    assert report["overall"]["errors"] == 1 and report["overall"]["count"] == 3

    FixedAnswerHandler.token = "secret"
    with pytest.raises(EndpointError, match="401"):
        evaluate(bad, endpoint=fixed_server, api="ollama", model="fixed", out=tmp_path / "k.json")
    report = evaluate(bad, endpoint=fixed_server, api="ollama", model="fixed", api_key="secret",
                      out=tmp_path / "k.json", chart=False)
    assert report["overall"]["count"] == 3

    with pytest.raises(EndpointError, match="cannot reach"):
        endpoint_backend(f"http://127.0.0.1:{free_port()}", "openai", retries=0)


# ---- bad input --------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(world, mmbench, tmp_path):
    with pytest.raises(EvalDataNotFoundError, match="does not exist") as e:
        load_dataset(tmp_path / "nope.json")
    assert isinstance(e.value, FovealError) and isinstance(e.value, FileNotFoundError)
    broken = tmp_path / "broken.json"
    broken.write_text('{"questions": [')
    with pytest.raises(EvalDataError, match="not valid JSON"):
        load_dataset(broken)
    with pytest.raises(EvalDataError, match="unknown dataset format 'coco'"):
        load_dataset(world["pope"], format="coco")
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(EvalDataError, match="cannot tell the format"):
        load_dataset(other)
    with pytest.raises(EvalDataError, match="annotations file"):
        load_dataset(world["vqa_annotations"])
    lonely = tmp_path / "questions.json"
    lonely.write_text(Path(world["vqa_questions"]).read_text())
    with pytest.raises(EvalDataNotFoundError, match="--annotations"):
        load_dataset(lonely)
    with pytest.raises(EvalDataNotFoundError, match="image"):
        load_dataset(lonely, annotations=world["vqa_annotations"])      # images/ is not next to this copy
    bad_label = tmp_path / "pope.jsonl"
    bad_label.write_text(json.dumps({"question_id": 1, "image": "x.png", "text": "Is there a cat?",
                                     "label": "maybe"}) + "\n")
    with pytest.raises(EvalDataError, match="'yes' or 'no'"):
        load_dataset(bad_label)
    with pytest.raises(EvalDataError, match="answer"):
        load_dataset(write_mmbench(tmp_path / "test.tsv", with_answer=False))
    with pytest.raises(EvalDataError, match="circular"):
        load_dataset(world["pope"], circular=True)
    with pytest.raises(EvalDataError, match="limit"):
        load_dataset(world["pope"], limit=0)
    with pytest.raises(EvalConfigError, match="unknown --api 'grpc'"):
        endpoint_backend("http://127.0.0.1:1", "grpc")
    with pytest.raises(EvalConfigError, match="http"):
        endpoint_backend("localhost:11434", "ollama")
    with pytest.raises(EvalDataError, match="not a foveal eval report"):
        load_report(world["pope"].parent / "dataset.json")


def test_cli_bad_inputs_print_one_line(world, tmp_path, capsys):
    cases = [
        (["eval", "--data", str(tmp_path / "missing.json")], "does not exist"),
        (["eval", "--data", str(world["pope"]), "--endpoint", "http://127.0.0.1:1", "--api", "grpc"],
         "unknown --api 'grpc'"),
        (["eval", "--data", str(world["pope"]), "--format", "xml"], "unknown dataset format"),
        (["eval", "--data", str(world["pope"]), "--api", "ollama"], "--endpoint"),
        (["eval"], "--data"),
        (["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")], "does not exist"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], (argv, err)
