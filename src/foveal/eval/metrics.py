"""Scoring: VQAv2 accuracy, exact match, POPE, multiple choice (MMBench style), grouped summaries.

Design decisions:
- Answer normalisation mirrors the official VQA evaluation script
  (https://github.com/GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py):
  its contractions table, number words, articles, punctuation list and the two regexes are
  copied as they are, quirks included (curly apostrophes in the contractions' values, the
  `(?!<=\\d)` look-ahead that was meant as a look-behind, capitalised keys that can never match
  lower-cased words), so our numbers line up with published ones.
- Deliberate differences from that script, each because it has a known bug or assumes VQAv2's
  pre-cleaned answers: ground-truth answers get the same full normalisation as predictions (the
  script only strips their punctuation, and only when annotators disagree: harmless on VQAv2,
  wrong on TextVQA or hand-written files); per-type accuracy uses the question's averaged score
  (the script appends the last leave-one-out value instead); files with fewer than four answers
  per question lower the "3 humans" threshold to n-1 so a unanimous answer still scores 1.
- POPE parsing is POPE's own (evaluate.py): keep the first sentence, drop commas, the answer is
  "no" if the words contain "No", "no" or "not", else "yes".
- Multiple-choice extraction follows MMBench's `can_infer` (a single option letter standing as
  a word, else a single option text contained in the answer), after two explicit patterns
  ("The answer is (B)", a leading "B." / "(B)"). Circular evaluation: a question counts as right
  only if every rotation of its options is answered right.
- Scores are fractions in [0, 1]; printing as percentages is the report's job.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache
from collections.abc import Iterable, Sequence

# ---- VQA answer normalisation (official vqaEval.py tables) ---------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t",
    "dont": "don’t", "hadnt": "hadn’t", "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t",
    "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s",
    "howd": "how’d", "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m",
    "Ive": "I’ve", "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve", "itll": "it’ll",
    "let’s": "let’s", "maam": "ma’am", "mightnt": "mightn’t", "mightnt’ve": "mightn’t’ve",
    "mightn’tve": "mightn’t’ve", "mightve": "might’ve", "mustnt": "mustn’t", "mustve": "must’ve",
    "neednt": "needn’t", "notve": "not’ve", "oclock": "o’clock", "oughtnt": "oughtn’t",
    "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at", "’ow’sat": "’ow’s’at", "shant": "shan’t",
    "shed’ve": "she’d’ve", "she’dve": "she’d’ve", "she’s": "she’s", "shouldve": "should’ve",
    "shouldnt": "shouldn’t", "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve",
    "somebody’d": "somebodyd", "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll", "somebodys": "somebody’s", "someoned": "someone’d",
    "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve", "someonell": "someone’ll",
    "someones": "someone’s", "somethingd": "something’d", "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve", "somethingll": "something’ll", "thats": "that’s",
    "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve", "therere": "there’re",
    "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve", "they’dve": "they’d’ve",
    "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve", "twas": "’twas", "wasnt": "wasn’t",
    "wed’ve": "we’d’ve", "we’dve": "we’d’ve", "weve": "we've", "werent": "weren’t", "whatll": "what’ll",
    "whatre": "what’re", "whats": "what’s", "whatve": "what’ve", "whens": "when’s", "whered": "where’d",
    "wheres": "where's", "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve",
    "who’dve": "who’d’ve", "wholl": "who’ll", "whos": "who’s", "whove": "who've", "whyll": "why’ll",
    "whyre": "why’re", "whys": "why’s", "wont": "won’t", "wouldve": "would’ve", "wouldnt": "wouldn’t",
    "wouldnt’ve": "wouldn’t’ve", "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll",
    "y’allll": "y’all’ll", "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve",
    "youd": "you’d", "youd’ve": "you’d’ve", "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re",
    "youve": "you’ve",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")    # sic: strips every "." not followed by a digit
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PUNCTUATION = [";", ":", r"/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",",
               "?"]


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a punctuation mark next to a space (or any text with a comma
    between digits, "1,000") is deleted, otherwise it becomes a space; then periods go."""
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words to digits, articles dropped,
    contractions restored."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official answer normalisation: "Two" -> "2", "a dog." -> "dog", "dont" -> "don’t"."""
    return _normalize(str(text))


@lru_cache(maxsize=1 << 16)       # reference answers repeat a lot ("yes", "2"): normalise each once
def _normalize(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy: min(#other annotators who gave the answer / 3, 1), averaged over the n
    leave-one-out subsets of the n human answers (10 choose 9 for VQAv2)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    need = min(3, len(refs) - 1)
    scores = []
    for left_out in range(len(refs)):
        matches = sum(r == pred for i, r in enumerate(refs) if i != left_out)
        scores.append(min(1.0, matches / need))
    return sum(scores) / len(scores)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent (normalised) answer; ties go to the first seen, like VQAv2's
    multiple_choice_answer."""
    counts: dict[str, int] = {}
    for a in answers:
        key = normalize_answer(a)
        counts[key] = counts.get(key, 0) + 1
    return max(counts, key=counts.get)


# ---- POPE ----------------------------------------------------------------------------------

def pope_parse(text: str) -> str:
    """POPE's evaluate.py: first sentence, commas dropped, "no" if No/no/not is a word."""
    text = str(text)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split()
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_label(label) -> str:
    value = str(label).strip().lower()
    if value not in ("yes", "no"):
        raise ValueError(f"a POPE label must be 'yes' or 'no', got {label!r}")
    return value


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 (positive = "yes") and the yes-ratio of parsed answers.
    `predictions` are already parsed to "yes"/"no"."""
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    tp = sum(p == "yes" and y == "yes" for p, y in zip(predictions, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(predictions, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(predictions, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(predictions, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# ---- multiple choice -------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"(?i:\b(?:answer|option|choice)\b)(?:\s+(?i:is))?\s*[:：]?\s*[\(\[]?([A-Z])(?![A-Za-z])")
_LEADING = re.compile(r"^\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])(?:[.:)]|\s*$))")
_SPLIT_CHARS = ".()[],:;!*#{}"


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text answer picks, or None if it picks none or several.

    `options` maps letters to option texts, e.g. {"A": "cat", "B": "dog"}."""
    text = str(text).strip()
    if not text:
        return None
    letters = set(options)
    m = _ANSWER_IS.search(text)
    if m and m.group(1) in letters:
        return m.group(1)
    m = _LEADING.match(text)
    if m:
        letter = next(g for g in m.groups() if g)
        if letter in letters:
            return letter
    # MMBench can_infer_option: exactly one option letter standing alone as a word.
    cleaned = text
    for c in _SPLIT_CHARS:
        cleaned = cleaned.replace(c, " ")
    words = cleaned.split()
    found = [ch for ch in sorted(letters) if ch in words]
    # "A" opening a sentence is an article more often than an answer (MMBench's caveat).
    if len(found) == 1 and not (found[0] == "A" and words[0] == "A" and len(words) > 3):
        return found[0]
    # MMBench can_infer_text: exactly one option text inside the answer (a text that is part of
    # another matching option's text, "red" in "dark red", gives way to the longer one).
    lower = text.lower()
    hits = {k: str(v).strip().lower() for k, v in options.items() if str(v).strip() and str(v).strip().lower() in lower}
    hits = {k: v for k, v in hits.items() if not any(v != w and v in w for w in hits.values())}
    return next(iter(hits)) if len(hits) == 1 else None


def rotate_options(options: dict[str, str], answer: str, k: int) -> tuple[dict[str, str], str]:
    """Rotation k of circular evaluation: option texts move k places up (the text at letter k
    becomes A), and the correct letter moves with its text."""
    letters = sorted(options)
    texts = [options[c] for c in letters]
    n = len(letters)
    rotated = {letters[i]: texts[(i + k) % n] for i in range(n)}
    return rotated, letters[(letters.index(answer) - k) % n]


# ---- summaries over scored records ------------------------------------------------------------

PRIMARY_METRIC = {"vqa": "vqa_accuracy", "exact": "exact_match", "pope": "f1", "mc": "accuracy"}
METRICS = {"vqa": ("vqa_accuracy", "exact_match"), "exact": ("exact_match",),
           "pope": ("accuracy", "precision", "recall", "f1", "yes_ratio"),
           "mc": ("accuracy", "circular_accuracy", "unparsed")}


def summarize(kind: str, records: Iterable[dict]) -> dict:
    """One row of a report from scored records (see runner.score_item for their fields)."""
    records = list(records)
    row: dict = {"count": len(records)}
    if kind in ("vqa", "exact"):
        for name in METRICS[kind]:
            row[name] = sum(r[name] for r in records) / len(records) if records else 0.0
    elif kind == "pope":
        row.update(pope_metrics([r["parsed"] for r in records], [r["label"] for r in records]))
    elif kind == "mc":
        row["accuracy"] = sum(r["correct"] for r in records) / len(records) if records else 0.0
        row["unparsed"] = sum(r["extracted"] is None for r in records) / len(records) if records else 0.0
        groups: dict[str, bool] = defaultdict(lambda: True)
        for r in records:
            groups[r["group"]] &= bool(r["correct"])
        row["questions"] = len(groups)
        if any(r.get("rotation", 0) for r in records):
            row["circular_accuracy"] = sum(groups.values()) / len(groups)
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    row["errors"] = sum(1 for r in records if r.get("error"))
    return row


def breakdown(kind: str, records: Sequence[dict], field: str) -> dict[str, dict]:
    by: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by[str(r[field])].append(r)
    return {key: summarize(kind, by[key]) for key in sorted(by)}
