"""`foveal train recipe shapes -o OUT`: every stage of the bundled model, in order, on a time budget.

    data -> clip -> lm -> assemble -> [dense] -> align -> instruct-plain -> instruct -> eval (held-out VQA + POPE)

Writes OUT/model (the ready HF LLaVA checkpoint), OUT/reports/{vqa,pope}.json (+ tables and charts),
OUT/recipe.json (per-stage times, figures, load average), and each stage's own folder (data/, clip/,
lm/, assembled/, align/, instruct-plain/, instruct/) with its logs and loss curve.

Design decisions:
- One budget in minutes is shared out by fractions; each training stage runs on a time budget
  (its cosine schedule decays by time, see `trainer.budget_lr_factor`), so the recipe ends near the
  budget on a fast or a contended machine alike. Instruct gets whatever the earlier stages left,
  less a reserve for evaluation.
- Seeds: the training world is `seed`; the CLIP retrieval check uses `seed + 7919`; the held-out
  evaluation world is EVAL_SEED, which no training stage ever draws from.
- Stage 2 trains the whole model: projector, LM and (at a tenth of their learning rate) the vision
  tower; a tower pretrained only on captions does not yet resolve everything the questions ask, but
  a tower that moves fast early destroys the features the projector was calibrated on (measured:
  at the LM's learning rate the model never learnt to look at the image).
- The CLIP stage trains the tower with dense scene labels beside the contrastive losses (each
  patch inside an object names its shape, colour and size; each patch inside a rendered
  character names it; see train/clip.py), captions at weight 0.2, no region phrases, batch 64 at
  lr 3e-3, on 15 % of the budget. Measured: a LLaVA reads one patch at a time, and the earlier
  recipe's tower read shape from single patches at 44 %; this one at 92.6 %. The whole recipe
  with it (without the character head) went from 62.7 % to 64.6 % overall and shape from 31.5 %
  to 59.1 %, and its wrong shapes are now other objects' shapes (100 of 104), not absent ones:
  what is left is the LM finding the object the question names.
- The LM has as many key/value heads as query heads (3 at width 192).
- The LM reads one document per scene (its captions, then its questions with their answers), each
  block starting at a document, for 22 % of the budget. Stage 2 asks it to look an object up among
  the image tokens; an LM that cannot look one up in its text context has no such circuit to lend.
  On separate sentences for 6 % of the budget (~520 steps) it answered "What color is the circle?"
  from the caption in front of it 10 % of the time; on scene documents the lookup starts to form
  between 750 and 1,000 steps.
- The CLIP stage also names each object patch's grid cell (`clip.label_cells`). With an LM that
  cannot look things up it hurt (README: 73.7 % against 78.1 %, POPE and shape down); with the
  scene-document LM it helps: 93.6 % against 91.4 %, where 72.7 -> 96.0 %, describe 82.0 -> 95.3 %,
  POPE F1 1.0 on every mode, for colour 97.6 -> 89.5 % and shape 99.2 -> 92.9 %.
- The chat template (bundled.CHAT_TEMPLATE) puts the space before each answer inside its
  `{% generation %}` span, so stage 2 trains the model to write it: reading 67.5 -> 97.5 %, and
  93.6 -> 96.2 % overall in the next run (README).
- The dense word alignment of the projector before stage 1 (`--dense-share`, see train/dense.py)
  is off by default: measured no better overall in a whole run with the earlier LM (README,
  2026-11-29); it balances what the image tokens carry, yet colour questions that name their
  object by its shape stayed at chance among the scene's objects.
- The projector is initialised from the first training images' feature statistics
  (`assemble.calibrate_projector`): without it the LM ignored the image entirely.
- A share of the instruct questions carries LLaVA's short-answer instruction ("Answer the question
  using a single word or phrase."), as LLaVA-1.5's VQA data does, so `foveal eval`'s default
  prompt and the bare question get the same answers. Descriptions never carry it.
- Stage 2 runs in two phases: bare answers for `plain_first_share` (66 %) of its time, then the same
  records with each relation answer opening with a thought, at `thoughts_lr_scale` (0.3x) of its
  learning rates. The thought places both objects and ends with the one comparison that decides the
  answer, "is x less than y?", the numbers ordered so that "less than" is always the question (the
  mirror pairs left / right and above / below made the earlier ending, "so 1 left of 3", an XOR no
  single word predicts, which a text LM learnt slowly). Measured in two whole runs: 97.7 and 98.5 %
  overall (96.2 % before), relation 82.6 and 86.2 % (44.0 %), every type above 85 % (README).
  Stage 2 has to find the lookup of an object by its shape before a thought can use it: with
  thoughts from the start, or with thoughts in the LM's documents too (`document_thoughts`, off),
  two runs did not (where ~50 %).
- Evaluation asks bare questions, greedy, with room for the longest description.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..eval.datasets import SHORT_ANSWER

RECIPES = ("shapes",)
EVAL_SEED = 20_251_109        # the held-out world: never drawn from by any training stage


@dataclass
class RecipeConfig:
    output_dir: str
    minutes: float = 59.0
    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    eval_scenes: int = 150                  # ~16 questions a scene: ~2,400 held-out questions
    train_scenes: int | None = None         # default: scaled to the budget
    # sizes
    vision_width: int = 128
    vision_layers: int = 4
    lm_hidden: int = 192
    lm_intermediate: int = 512
    lm_layers: int = 4
    vocab_size: int = 512
    lm_kv_heads: int | None = None          # None: as many as query heads
    # the CLIP stage (train/clip.py): dense scene labels under every patch, captions turned down
    clip_label_weight: float = 4.0
    clip_label_chars: bool = True
    clip_label_cells: bool = True             # each object patch also names its grid cell (measured: see README)
    # ... and which kinds of object lie left / right / above / below it; off: measured worse (README,
    # "Reading, and relations in the tower")
    clip_label_relations: bool = False
    clip_caption_weight: float = 0.2
    clip_region_weight: float = 0.0           # region-phrase contrast
    clip_batch: int = 64
    clip_lr: float = 3e-3
    # a relation question's answer in stage 2 opens with a thought: where its two objects are, then the one
    # comparison that decides it (README, "Relations: one comparison, one way round")
    relation_thoughts: bool = True
    # with relation_thoughts: whether the LM's scene documents carry them too. Measured: with them a document
    # is 12 % longer (median 295 tokens against 263), 5 % outgrow the LM's 384-token block, and neither run
    # whose LM read them found the lookup of an object by its shape in stage 2 (where ~50 %)
    document_thoughts: bool = False
    # with relation_thoughts: the share of stage 2's time trained first on bare relation answers, before the
    # records with thoughts take over at `thoughts_lr_scale` of stage 2's learning rates (0: thoughts from the
    # start). Stage 2 has to find the lookup of an object by its name before a thought can use it.
    plain_first_share: float = 0.66
    thoughts_lr_scale: float = 0.3
    # budget shares (of the whole recipe)
    clip_share: float = 0.15
    lm_share: float = 0.22
    lm_seq_len: int = 384                   # a block holds a whole scene document (~255 tokens, at most ~380)
    align_share: float = 0.08
    dense_share: float = 0.0                  # dense word alignment of the projector before align (train/dense.py)
    eval_reserve_share: float = 0.04          # the held-out eval takes ~1 minute
    # stage 2
    instruct_batch: int = 8
    lr_lm: float = 1e-3
    lr_projector: float = 1e-3
    lr_vision: float = 1e-4
    save_dtype: str | None = None           # None: float32
    progress: bool = True
    stages: tuple[str, ...] = ("data", "clip", "lm", "assemble", "dense", "align", "instruct", "eval")
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.minutes <= 0:
            raise ConfigError(f"--minutes-budget must be > 0, got {self.minutes}")
        if self.eval_scenes < 1:
            raise ConfigError("eval-scenes must be >= 1")
        if not 0 <= self.plain_first_share < 1:
            raise ConfigError(f"--plain-first-share must be within [0, 1), got {self.plain_first_share}")
        if not 0 < self.thoughts_lr_scale <= 10:
            raise ConfigError(f"thoughts_lr_scale must be within (0, 10], got {self.thoughts_lr_scale}")
        if not 0 <= self.dense_share < 1:
            raise ConfigError(f"--dense-share must be within [0, 1), got {self.dense_share}")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ConfigError(f"--patch-size {self.patch_size} must divide --image-size {self.image_size}")


def _options(cfg: RecipeConfig, stage: str, /, **settings) -> dict:
    """The recipe's settings for a stage, overridden by the user's (`--stage-option STAGE.KEY=VALUE`)."""
    return {**settings, **cfg.extra.get(stage, {})}


def _say(text: str) -> None:
    print(f"[recipe {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def add_short_answer_instruction(path: Path, share: float, seed: int) -> None:
    """Append LLaVA's short-answer instruction to a share of the non-description questions."""
    from ..data.language import TEMPLATES
    describe = set(TEMPLATES["describe"]) | set(TEMPLATES["caption_prompt"])
    records = json.loads(path.read_text())
    rng = random.Random(seed)
    for r in records:
        for turn in r["conversations"]:
            if turn["from"] != "human":
                continue
            question = turn["value"].removeprefix("<image>\n")
            if question not in describe and rng.random() < share:
                turn["value"] += "\n" + SHORT_ANSWER
    path.write_text(json.dumps(records))


def run_recipe(cfg: RecipeConfig) -> dict:
    from ..data import WorldConfig, write_dataset
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    budget_s = cfg.minutes * 60
    summary: dict = {"recipe": "shapes", "budget_minutes": cfg.minutes, "seed": cfg.seed, "eval_seed": EVAL_SEED,
                     "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "load_average_start": _load(), "stages": {}}
    loads: list[list[float]] = []

    def stage_done(name: str, t0: float, **info) -> None:
        loads.append(_load())
        summary["stages"][name] = {"seconds": round(time.perf_counter() - t0, 1), **info}
        _say(f"{name} done in {time.perf_counter() - t0:.0f} s (recipe at {time.perf_counter() - t_start:.0f} s, "
             f"load average {loads[-1]})")
        (out / "recipe.json").write_text(json.dumps(summary, indent=2))

    world = WorldConfig(image_size=cfg.image_size)
    data_dir, eval_dir = out / "data" / "train", out / "data" / "heldout"
    n_train = cfg.train_scenes or int(min(16000, max(200, cfg.minutes * 300)))
    two_phase = cfg.relation_thoughts and cfg.plain_first_share > 0
    if "data" in cfg.stages:
        t0 = time.perf_counter()
        _say(f"data: {n_train} training scenes (seed {cfg.seed}), {cfg.eval_scenes} held-out scenes (seed {EVAL_SEED})")
        write_dataset(data_dir, n_train, cfg.seed, world, ("captions", "instruct", "documents"),
                      relation_thoughts=cfg.relation_thoughts, document_thoughts=cfg.document_thoughts)
        add_short_answer_instruction(data_dir / "llava_instruct.json", 0.3, cfg.seed)
        if two_phase:
            write_instruct_records(data_dir / PLAIN_INSTRUCT, n_train, cfg.seed, world)
            add_short_answer_instruction(data_dir / PLAIN_INSTRUCT, 0.3, cfg.seed)
        write_dataset(eval_dir, cfg.eval_scenes, EVAL_SEED, world, ("vqa", "pope"))
        stage_done("data", t0, train_scenes=n_train, eval_scenes=cfg.eval_scenes)

    if "clip" in cfg.stages:
        from .clip import ClipConfig, train_clip
        t0 = time.perf_counter()
        report = train_clip(ClipConfig(**_options(cfg, "clip", output_dir=str(out / "clip"),
                                       image_size=cfg.image_size,
                                       patch_size=cfg.patch_size, vision_width=cfg.vision_width,
                                       vision_layers=cfg.vision_layers, vision_heads=max(1, cfg.vision_width // 32),
                                       max_steps=100_000, minutes=cfg.minutes * cfg.clip_share, seed=cfg.seed,
                                       progress=cfg.progress, region_weight=cfg.clip_region_weight,
                                       label_weight=cfg.clip_label_weight, label_chars=cfg.clip_label_chars,
                                       label_cells=cfg.clip_label_cells, label_relations=cfg.clip_label_relations,
                                       caption_weight=cfg.clip_caption_weight, batch_size=cfg.clip_batch,
                                       lr=cfg.clip_lr)))
        stage_done("clip", t0, steps=report["steps"], final_loss=report["final_loss"],
                   retrieval=report["retrieval"])

    if "lm" in cfg.stages:
        from .lm import LMConfig, train_lm
        t0 = time.perf_counter()
        result = train_lm(LMConfig(**_options(cfg, "lm", corpus=str(data_dir / "corpus.jsonl"),
                                   output_dir=str(out / "lm"),
                                   vocab_size=cfg.vocab_size, hidden_size=cfg.lm_hidden,
                                   intermediate_size=cfg.lm_intermediate, num_layers=cfg.lm_layers,
                                   num_heads=max(1, cfg.lm_hidden // 64),
                                   num_kv_heads=cfg.lm_kv_heads or max(1, cfg.lm_hidden // 64),
                                   seq_len=cfg.lm_seq_len, whole_documents=True, batch_size=16, max_steps=100_000,
                                   lr=1e-3, seed=cfg.seed,
                                   minutes=cfg.minutes * cfg.lm_share, progress=cfg.progress)))
        stage_done("lm", t0, steps=len(result.steps), final_loss=round(result.losses[-1], 4))

    if "assemble" in cfg.stages:
        from .assemble import assemble, calibration_images_in
        t0 = time.perf_counter()
        # the projector's data-dependent init reads the first training images (see assemble.py)
        calibration = calibration_images_in(data_dir / "images")
        assemble(out / "clip", out / "lm", out / "assembled", seed=cfg.seed, calibration_images=calibration)
        stage_done("assemble", t0, calibration_images=len(calibration))

    dense = cfg.dense_share > 0           # stage 1 then starts from the densely aligned projector
    if dense and "dense" in cfg.stages:
        from .dense import DenseAlignConfig, dense_align
        t0 = time.perf_counter()
        report = dense_align(DenseAlignConfig(**_options(cfg, "dense", model=str(out / "assembled"),
                                                         output_dir=str(out / "dense"), seed=cfg.seed,
                                                         minutes=cfg.minutes * cfg.dense_share,
                                                         progress=cfg.progress)))
        stage_done("dense", t0, steps=report["steps"], final_loss=report["final_loss"])

    from .trainer import TrainConfig, train
    if "align" in cfg.stages:
        t0 = time.perf_counter()
        result = train(TrainConfig(**_options(cfg, "align", stage="align",
                                   model=str(out / ("dense" if dense else "assembled")),
                                   data=str(data_dir / "llava_captions.json"),
                                   output_dir=str(out / "align"), batch_size=32, epochs=100.0, lr_projector=1e-3,
                                   group_by_length=True,
                                   max_minutes=cfg.minutes * cfg.align_share, seed=cfg.seed, progress=cfg.progress)))
        stage_done("align", t0, steps=len(result.steps), final_loss=round(result.losses[-1], 4))

    if "instruct" in cfg.stages:
        t0 = time.perf_counter()
        # reading and tokenizing the records (~7 ms each) comes out of the same budget
        left = budget_s - (time.perf_counter() - t_start) - cfg.eval_reserve_share * budget_s - 0.008 * n_train
        minutes = max(0.5, left / 60)
        _say(f"instruct: {minutes:.1f} minutes")
        settings = _options(cfg, "instruct", stage="instruct", model=str(out / "align"),
                            data=str(data_dir / "llava_instruct.json"),
                            output_dir=str(out / "instruct"), batch_size=cfg.instruct_batch, epochs=100.0,
                            lr_projector=cfg.lr_projector, lr_lm=cfg.lr_lm, train_vision=True,
                            lr_vision=cfg.lr_vision, warmup_ratio=0.02, max_minutes=minutes, group_by_length=True,
                            weight_decay=0.0, seed=cfg.seed, save_dtype=cfg.save_dtype, progress=cfg.progress)
        if two_phase:
            first = {**settings, "data": str(data_dir / PLAIN_INSTRUCT), "output_dir": str(out / "instruct-plain"),
                     "max_minutes": minutes * cfg.plain_first_share}
            plain = train(TrainConfig(**first))
            stage_done("instruct-plain", t0, steps=len(plain.steps), final_loss=round(plain.losses[-1], 4),
                       examples=len(plain.steps) * settings["batch_size"])
            t0 = time.perf_counter()
            scale = cfg.thoughts_lr_scale
            settings = {**settings, "model": str(out / "instruct-plain"),
                        "max_minutes": minutes * (1 - cfg.plain_first_share),
                        **{k: settings[k] * scale for k in ("lr_projector", "lr_lm", "lr_vision")}}
        result = train(TrainConfig(**settings))
        stage_done("instruct", t0, steps=len(result.steps), final_loss=round(result.losses[-1], 4),
                   examples=len(result.steps) * settings["batch_size"])
        _publish(out / "instruct", out / "model")

    if "eval" in cfg.stages:
        t0 = time.perf_counter()
        summary["eval"] = evaluate_model(out / "model", eval_dir, out / "reports")
        stage_done("eval", t0)
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    summary["total_minutes"] = round(summary["total_seconds"] / 60, 2)
    summary["load_average_during"] = loads
    summary["model_bytes"] = sum(p.stat().st_size for p in (out / "model").iterdir()) if (out / "model").exists() else 0
    if "eval" in summary:
        summary["targets_met"] = targets_met(summary["eval"])
    (out / "recipe.json").write_text(json.dumps(summary, indent=2))
    _say(f"done in {summary['total_minutes']:.1f} min; model {out / 'model'} "
         f"({summary['model_bytes'] / 1e6:.1f} MB); summary {out / 'recipe.json'}")
    return summary


PLAIN_INSTRUCT = "llava_instruct_plain.json"    # stage 2's records with bare relation answers (plain_first_share)


def write_instruct_records(path: Path, n: int, seed: int, world) -> None:
    """The stage-2 records of the first n scenes with bare relation answers, the images being the ones
    `write_dataset` wrote beside `path` for the same scenes."""
    from ..data import generate
    from ..data.export import llava_record
    records = [llava_record(ex) for ex in generate(n, seed, world, images=False)]
    path.write_text(json.dumps(records))


MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "preprocessor_config.json", "processor_config.json", "generation_config.json")


def _publish(src: Path, dst: Path) -> None:
    """Copy only the model files (not logs, plots or checkpoints) into the ready-model folder."""
    import shutil
    dst.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def evaluate_model(model_dir: Path, eval_dir: Path, reports: Path, max_tokens: int = 96) -> dict:
    """Held-out VQA-style (every question type) and POPE; bare questions, greedy."""
    from ..api import load
    from ..eval import format_table, load_dataset, run_eval
    from ..eval.backends import LocalBackend
    reports.mkdir(parents=True, exist_ok=True)
    backend = LocalBackend(load(str(model_dir)))
    figures = {}
    try:
        for name, path in (("vqa", eval_dir / "vqa_questions.json"), ("pope", eval_dir / "pope.jsonl")):
            dataset = load_dataset(str(path), prompt_suffix="")
            report = run_eval(dataset, backend, reports / f"{name}.json", max_tokens=max_tokens, restart=True,
                              progress=None)
            table = format_table(report)
            (reports / f"{name}.txt").write_text(table + "\n")
            print(table, file=sys.stderr)
            figures[name] = {"overall": report["overall"], "per_type": report.get("per_type", {}),
                             "per_category": report.get("per_category", {})}
    finally:
        backend.close()
    return figures


def targets_met(figures: dict) -> dict:
    vqa, pope = figures.get("vqa", {}), figures.get("pope", {})
    overall = vqa.get("overall", {}).get("exact_match", 0.0)
    types = {t: m.get("exact_match", 0.0) for t, m in vqa.get("per_type", {}).items()}
    cats = pope.get("per_category", {})
    pope_ok = {c: m.get("f1", 0.0) >= 0.95 and 0.45 <= m.get("yes_ratio", 0.0) <= 0.55 for c, m in cats.items()}
    return {"overall_exact_match>=0.95": overall >= 0.95,
            "every_type>=0.85": bool(types) and all(v >= 0.85 for v in types.values()),
            "pope_f1>=0.95_and_yes_ratio_0.45-0.55": bool(pope_ok) and all(pope_ok.values())}
