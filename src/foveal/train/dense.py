"""Dense stage-1 alignment for the synthetic world: each image token is taught to read as the words
of the object it lies in, in the LM's own vocabulary, before the caption alignment.

    dense_align(DenseAlignConfig(model=ASSEMBLED_DIR, output_dir=OUT, minutes=1.1))

Design decisions:
- What a LLaVA's LM can bind on is what is salient in its image tokens. Measured on the recipe's
  models (between-object-class share of the variance of the projected patches inside objects,
  300 scenes of an unseen seed): the 78.1 % model's tokens carried colour 36 %, size 22 %, shape
  15 %, cell 2 %, and it answered colour questions that name the object by its shape no better
  than picking an object at random, while shape questions that name it by colour were right
  90 %; a tower with a cell head made the tokens cell 39 %, colour 6 %, and colour-named lookups
  then failed as well. The tower reads all four at 99-100 % per patch, so the LM's lookup, not
  perception, decides.
- So the projector alone is trained first to make each patch inside an object predict, through
  the LM's tied output head, that object's size, colour and shape words (and, with `cells`, the
  words of its grid cell; with `chars`, the character under a glyph patch), all equally (a soft
  target spread over the words' tokens). An image token then resembles the words a caption would
  use for it, each with a fair share, which is how the text-pretrained LM already finds an object
  named in a question (the world's corpus answers questions about the description before them).
- Measured (whole recipe, 55-minute budget, with the cell head; README): the stage leaves the
  tokens balanced (shape 16 %, colour 25 %, size 16 %, cell 35 % after stage 2) and shape answers
  rose from 59.4 % to 76.8 %, but colour questions named by shape stayed at chance among the
  scene's objects and POPE fell, 73.0 % overall against 78.1 % for the recipe without either; so
  the recipe leaves it off (`--dense-share 0`) and salience is not what holds binding back.
- The tower and the LM are frozen and not saved differently; only the projector moves. Background
  patches are left free. The scenes are the training world's (`seed`), regenerated from their index,
  so the stage needs no files of its own: it is the synthetic world's, like the CLIP stage's dense
  labels (train/clip.py), and a model of real images skips it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError


@dataclass
class DenseAlignConfig:
    model: str
    output_dir: str
    minutes: float | None = 1.0         # time budget (whichever of it and max_steps comes first)
    max_steps: int = 100_000
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0                       # the training world's seed
    cells: bool = True                  # also the object's grid-cell words ("bottom", "left")
    chars: bool = True                  # a glyph patch names its character
    progress: bool = True

    def __post_init__(self):
        if self.minutes is not None and not self.minutes > 0:
            raise ConfigError(f"minutes must be > 0, got {self.minutes}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise ConfigError(f"max-steps and batch-size must be >= 1, got {self.max_steps}, {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


def patch_word_targets(scenes, encode, grid: int, cells: bool = True, chars: bool = True
                       ) -> tuple[list[int], list[list[int]]]:
    """(batch-wide patch indices, the token ids each should name) for every patch whose centre lies
    inside an object (its size, colour and shape words, and with `cells` its cell's words) or, with
    `chars`, inside a rendered character (that character). `encode(text) -> ids`."""
    from .clip import CaptionBatcher, character_patches
    rows, targets = [], []
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            words = [o.size, o.color, o.shape] + (o.cell.split() if cells else [])
            ids = [i for w in words for i in encode(" " + w)]
            for j in CaptionBatcher._patches(o.bbox, scene.image_size / grid, grid, centres=True):
                rows.append(b * grid * grid + j)
                targets.append(ids)
    for idx, ch in character_patches(scenes, grid, centres=True) if chars else []:
        rows += idx
        targets += [encode(ch)] * len(idx)
    return rows, targets


def dense_loss(model, pixels: torch.Tensor, rows: list[int], targets: list[list[int]]) -> torch.Tensor:
    """Cross-entropy of the LM head read straight off each listed patch's projected feature against an
    even spread over its target tokens (the tower's features computed without gradients)."""
    with torch.no_grad():
        feats = model.image_features(pixels)
        feats = feats.reshape(-1, feats.shape[-1])[rows].float()
    soft = torch.zeros(len(rows), model.lm_head.weight.shape[0])
    for i, ids in enumerate(targets):
        soft[i, ids] = 1.0 / len(ids)
    logits = model.project(feats) @ model.lm_head.weight.t()
    return F.cross_entropy(logits.float(), soft)


def dense_align(cfg: DenseAlignConfig) -> dict:
    from ..api import load
    from ..data import WorldConfig, generate
    from ..processing.images import preprocess_batch
    from ..weights.save import save_checkpoint
    from .trainer import image_processor_dict
    vlm = load(cfg.model, dtype="float32")
    model, tok = vlm.model, vlm.tokenizer.tok
    if not model.has_vision or vlm.config.anyres:
        raise ConfigError("dense alignment needs a single-view LLaVA (what `foveal train assemble` builds)")
    size = vlm.config.vision.image_size
    grid = size // vlm.config.vision.patch_size
    if vlm.config.image_tokens_per_image != grid * grid:
        raise ConfigError("dense alignment needs one image token per patch (vision_feature_select_strategy default)")
    world = WorldConfig(image_size=size)
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids    # noqa: E731
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    t0, losses, start = time.perf_counter(), [], 0
    while len(losses) < cfg.max_steps and (cfg.minutes is None or time.perf_counter() - t0 < cfg.minutes * 60):
        examples = list(generate(cfg.batch_size, cfg.seed, world, start))
        start += cfg.batch_size
        rows, targets = patch_word_targets([e.scene for e in examples], encode, grid, cfg.cells, cfg.chars)
        if not rows:
            continue
        pixels = preprocess_batch([e.image for e in examples], vlm.image_config)
        with autocast:
            loss = dense_loss(model, pixels, rows, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if cfg.progress and len(losses) % 50 == 0:
            print(f"dense align: step {len(losses)}, loss {sum(losses[-50:]) / 50:.4f}", file=sys.stderr, flush=True)
    model.eval()
    out = Path(cfg.output_dir)
    save_checkpoint(model, vlm.config, out, tokenizer_json=tok.to_str(), tokenizer_config=dict(vlm.tokenizer.config),
                    chat_template=vlm.prompt.template, image_processor=image_processor_dict(vlm))
    report = {"steps": len(losses), "final_loss": round(losses[-1], 4) if losses else None,
              "seconds": round(time.perf_counter() - t0, 1), "config": asdict(cfg)}
    (out / "dense_report.json").write_text(json.dumps(report, indent=2))
    return report
