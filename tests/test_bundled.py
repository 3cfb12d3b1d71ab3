"""The bundled default model (`foveal/assets/default-model`, the output of `foveal train recipe shapes`).

What is checked: it is installed with the package files it needs and fits the 20 MB budget; it
loads in foveal and in transformers' LlavaForConditionalGeneration and both give the same greedy
tokens on ~20 held-out questions (a world seed no training stage used); it answers the README's
example questions about examples/shapes.png as examples/questions.txt records; `foveal run` with no
model uses it; its GGUF Q8_0/Q4_0 exports and int8/int4 weights agree with it; and (slow) the recipe
runs end to end at a tiny budget and writes a model and its reports.
"""

import json
from pathlib import Path

import pytest
import torch

import foveal
from foveal.bundled import ASSET_DIR
from foveal.cli import main as cli_main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HELD_OUT_SEED = 777_001          # not the recipe's training seed (0) nor its CLIP check seed (7919)
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "preprocessor_config.json", "processor_config.json")

pytestmark = pytest.mark.skipif(not (ASSET_DIR / "config.json").exists(), reason="no bundled model installed")


def example_questions() -> list[tuple[str, str, str]]:
    """(question, true answer, the bundled model's recorded float32 answer) from examples/questions.txt."""
    rows = []
    for line in (EXAMPLES / "questions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            question, truth, model = (part.strip() for part in line.split("->"))
            rows.append((question, truth, model))
    return rows


def held_out_questions(n: int = 20, per_type: int = 3, scenes: int = 12):
    """(image, question, answer) of every type, from an unseen world seed."""
    from foveal.data import generate
    out, seen = [], {}
    for ex in generate(scenes, seed=HELD_OUT_SEED):
        for q in ex.questions:
            if seen.get(q.type, 0) < per_type:
                seen[q.type] = seen.get(q.type, 0) + 1
                out.append((ex.image, q.question, q.answer))
    return out[:n]


@pytest.fixture(scope="module")
def ours():
    return foveal.load(None, dtype="float32")        # no model named: the bundled one


@pytest.fixture(scope="module")
def hf():
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(ASSET_DIR, dtype=torch.float32).eval()


def ask(vlm, image, question: str, max_tokens: int = 96):
    return vlm.generate([{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": question}]}], max_tokens=max_tokens)


def test_bundled_files_and_size():
    for name in MODEL_FILES:
        assert (ASSET_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in ASSET_DIR.iterdir() if p.is_file())
    assert total <= 20 * 1024 * 1024
    config = json.loads((ASSET_DIR / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_config"]["model_type"] == "clip_vision_model"


def test_foveal_and_transformers_agree_on_held_out_questions(ours, hf):
    from foveal.processing.images import preprocess_batch
    from foveal.processing.prompt import normalize_messages
    eos = set(ours.engine.eos_ids)
    questions = held_out_questions()
    assert len(questions) >= 18
    for image, question, _ in questions:
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": question}]}]
        template_messages, _ = normalize_messages(messages, ours.prompt.template)
        ids = torch.tensor([ours.prompt.build(template_messages, n_images=1).input_ids])
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              pixel_values=preprocess_batch([image], ours.image_config), max_new_tokens=64,
                              do_sample=False)[0, ids.shape[1]:].tolist()
        ref = ref[:next((i for i, t in enumerate(ref) if t in eos), len(ref))]
        assert ours.generate(messages, max_tokens=64).token_ids == ref, question


def test_transformers_autoprocessor_prepares_what_foveal_does(ours):
    """processor_config.json ships with the model: LlavaProcessor expands <image> to the image's 64 tokens
    and its pixels equal foveal's."""
    from transformers import AutoProcessor
    from foveal.processing.images import load_image, preprocess_batch
    image, question = str(EXAMPLES / "shapes.png"), "How many shapes are there?"
    processed = AutoProcessor.from_pretrained(ASSET_DIR).apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": question}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    ids, _ = ours.prompt_logits([{"role": "user", "content": [{"type": "image", "image": image},
                                                              {"type": "text", "text": question}]}])
    assert processed["input_ids"][0].tolist() == ids
    pixels = preprocess_batch([load_image(image).image], ours.image_config)
    assert (processed["pixel_values"] - pixels).abs().max().item() <= 1e-5


def test_bundled_model_gives_the_recorded_answers_to_the_example_questions(ours):
    """The README's example answers are what the model really says (float32, greedy); the true
    answers are beside them in the file, and the accuracy is measured by the recipe's eval."""
    rows = example_questions()
    assert len(rows) >= 6
    for question, _, recorded in rows:
        assert ask(ours, str(EXAMPLES / "shapes.png"), question).text.strip() == recorded, question


def test_cli_run_uses_the_bundled_model_when_none_is_named(capsys):
    assert cli_main(["run", "--image", str(EXAMPLES / "shapes.png"), "How many objects are in the image?",
                     "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == "3"          # the true count (bf16, the CLI's default dtype)


def agreement(reference: list[list[int]], other, questions) -> float:
    """Share of `questions` on which `other` writes the reference's greedy tokens (up to 48)."""
    same = sum(ids == ask(other, image, q, 48).token_ids for ids, (image, q, _) in zip(reference, questions))
    return same / len(questions)


@pytest.fixture(scope="module")
def quant_questions():
    return held_out_questions(n=200, per_type=29, scenes=200)


@pytest.fixture(scope="module")
def quant_reference(ours, quant_questions):
    """The float32 model's answers to quant_questions, asked once for every quantized form."""
    return [ask(ours, image, q, 48).token_ids for image, q, _ in quant_questions]


# Measured on the shipped model (98.5 %, 2026-11-30; 200 held-out questions, whole greedy answers of up to
# 48 tokens, a relation's thought included): F16, int8 100 %, Q8_0 99.5 %, Q4_0 99.0 %, int4 98.5 %. Q8_0's
# one change is a description on which the float32 model named one object twice and Q8_0 got it right: a
# near-tie. On 70 questions that one change alone was 98.6 %, under Q8_0's floor, hence 200.
# On the one before it (96.2 %; 70 questions): F16, Q8_0, int8 100 %, Q4_0, int4 98.6 %.
# On the one before that (93.6 %): F16, Q8_0, int8,
# int4 100 %, Q4_0 98.6 %. On the model before that (78.1 %):
# F16 100 %, Q8_0 100 % (97.1 % with the head in Q8_0 too: one first-token change, one description;
# the export now keeps the head in F16 under q8_0), Q4_0 90.0 %, int8 100 %,
# int4 91.4 % (68.6 % before the output head was kept in int8). The small model's logits are flat,
# so weight noise flips near-ties, and the tied embedding/head is the most sensitive tensor.


@pytest.mark.parametrize("kind, floor", [("q8_0", 0.99), ("q4_0", 0.90)])
def test_gguf_exports_agree_with_the_bundled_model(quant_reference, quant_questions, tmp_path, kind, floor):
    """Greedy answers of the llama.cpp-format exports against the float32 original: Q8_0 >= 99 %,
    Q4_0 >= 90 % identical token sequences (issue: "Use the models people already have")."""
    assert len(quant_questions) >= 190
    assert cli_main(["export", str(ASSET_DIR), "--gguf", str(tmp_path), "--type", kind]) == 0
    model = next(p for p in tmp_path.glob("*.gguf") if "mmproj" not in p.name)
    mmproj = next(p for p in tmp_path.glob("*.gguf") if "mmproj" in p.name)
    gguf = foveal.load(str(model), mmproj=str(mmproj), dtype="float32")
    assert agreement(quant_reference, gguf, quant_questions) >= floor


@pytest.mark.parametrize("mode, floor", [("int8", 0.99), ("int4", 0.90)])
def test_quantized_weights_agree_with_the_bundled_model(quant_reference, quant_questions, mode, floor):
    """foveal's own weight-only quantization (`quant=`): int8 >= 99 %, int4 >= 90 % identical answers."""
    assert agreement(quant_reference, foveal.load(None, dtype="float32", quant=mode), quant_questions) >= floor


@pytest.mark.slow
def test_recipe_runs_end_to_end_at_a_tiny_budget(tmp_path):
    out = tmp_path / "recipe"
    assert cli_main(["train", "recipe", "shapes", "-o", str(out), "--minutes-budget", "2", "--train-scenes", "64",
                     "--eval-scenes", "4", "--dense-share", "0.05", "--no-progress"]) == 0
    summary = json.loads((out / "recipe.json").read_text())
    assert list(summary["stages"]) == ["data", "clip", "lm", "assemble", "dense", "align", "instruct-plain",
                                       "instruct", "eval"]
    assert summary["stages"]["dense"]["steps"] > 0
    assert json.loads((out / "align" / "train_config.json").read_text())["model"] == str(out / "dense")
    assert "retrieval" in summary["stages"]["clip"] and summary["model_bytes"] > 0
    for name in MODEL_FILES:
        assert (out / "model" / name).is_file(), name
    for report in ("vqa", "pope"):
        data = json.loads((out / "reports" / f"{report}.json").read_text())
        assert data["overall"]["count"] > 0
    assert set(summary["targets_met"]) == {"overall_exact_match>=0.95", "every_type>=0.85",
                                           "pope_f1>=0.95_and_yes_ratio_0.45-0.55"}
    vlm = foveal.load(out / "model")
    assert isinstance(ask(vlm, str(EXAMPLES / "shapes.png"), "How many shapes are there?", 8).text, str)
