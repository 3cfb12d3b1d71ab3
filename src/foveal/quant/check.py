"""What did quantization cost? Run the original and the quantized model side by side.

For each (image, question) sample: greedy answers from both (answer agreement), then both models
teacher-forced over the same text (prompt + the original's answer), comparing at every position
the top-1 token (agreement) and the distributions (KL(original || quantized), in nats).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError

DEFAULT_QUESTIONS = ["Describe this image.", "What colours do you see?", "How many objects are there?"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class CheckReport:
    samples: int = 0
    positions: int = 0
    top1_agreement: float = 0.0
    mean_kl: float = 0.0
    answer_agreement: float = 0.0
    answers: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.samples} samples, {self.positions} positions: top-1 agreement "
                f"{self.top1_agreement * 100:.2f}%, mean KL {self.mean_kl:.5f} nats, answer agreement "
                f"{self.answer_agreement * 100:.1f}%")


def load_samples(spec: str | Path | None, questions=DEFAULT_QUESTIONS) -> list[tuple[str | None, str]]:
    """(image path or None, question) pairs from: a folder of images, an image file, a comma-
    separated list of images, or a JSON / JSONL eval file of {"image", "question"|"prompt"} records."""
    if spec is None:
        return [(None, q) for q in questions]
    items = [Path(p) for p in str(spec).split(",")] if "," in str(spec) else [Path(spec)]
    out = []
    for p in items:
        if p.is_dir():
            out += [(str(f), q) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES for q in questions]
        elif p.suffix.lower() in (".json", ".jsonl") and p.is_file():
            text = p.read_text()
            try:
                records = ([json.loads(line) for line in text.splitlines() if line.strip()]
                           if p.suffix.lower() == ".jsonl" else json.loads(text))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: not valid JSON: {e}") from None
            for r in records if isinstance(records, list) else []:
                question = r.get("question") or r.get("prompt") or r.get("text")
                if question is None and r.get("conversations"):
                    question = str(r["conversations"][0].get("value", "")).replace("<image>", "").strip()
                image = r.get("image")
                if image is not None and not Path(image).is_absolute():
                    image = str(p.parent / image)
                out.append((image, question or questions[0]))
        elif p.is_file():
            out += [(str(p), q) for q in questions]
        else:
            raise ConfigError(f"--check {p}: not an image, a folder of images or a JSON / JSONL eval file")
    if not out:
        raise ConfigError(f"--check {spec}: found no samples")
    return out


def _messages(image, question, answer=None):
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": question}]
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def compare(original, quantized, samples, max_tokens: int = 24) -> CheckReport:
    """Side-by-side report for two loaded `VLM`s over (image, question) samples."""
    agree = positions = answers_same = 0
    kl_sum = 0.0
    report = CheckReport()
    for image, question in samples:
        if image and not original.model.has_vision:
            image = None
        ref = original.generate(_messages(image, question), max_tokens=max_tokens, temperature=0.0)
        got = quantized.generate(_messages(image, question), max_tokens=max_tokens, temperature=0.0)
        answers_same += ref.token_ids == got.token_ids
        report.answers.append({"image": image, "question": question, "original": ref.text, "quantized": got.text})
        forced = _messages(image, question, ref.text) if ref.text.strip() else _messages(image, question)
        _, lp = original.prompt_logits(forced)
        _, lq = quantized.prompt_logits(forced)
        lp, lq = lp.float().log_softmax(-1), lq.float().log_softmax(-1)     # (T, V)
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        kl_sum += float((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).sum())
        positions += lp.shape[0]
    report.samples, report.positions = len(samples), positions
    report.top1_agreement = agree / max(positions, 1)
    report.mean_kl = kl_sum / max(positions, 1)
    report.answer_agreement = answers_same / max(len(samples), 1)
    return report


def teacher_forced_agreement(original, quantized, texts: list[str]) -> tuple[float, float]:
    """(top-1 agreement, mean KL) of two VLMs over plain text prompts (no generation)."""
    agree = positions = 0
    kl = 0.0
    with torch.inference_mode():
        for text in texts:
            _, lp = original.prompt_logits([{"role": "user", "content": text}])
            _, lq = quantized.prompt_logits([{"role": "user", "content": text}])
            lp, lq = lp.float().log_softmax(-1), lq.float().log_softmax(-1)
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            kl += float((lp.exp() * (lp - lq)).sum(-1).sum())
            positions += lp.shape[0]
    return agree / positions, kl / positions
