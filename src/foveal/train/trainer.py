"""The LLaVA training stages: `align` (stage 1) and `instruct` (stage 2), one loop for both, for
LLaVA models and any family whose model says it is `trainable` (Qwen2-VL).

Mirrors LLaVA's scripts/v1_5/pretrain.sh and finetune(_lora).sh: stage 1 trains only the
projector on image-caption pairs; stage 2 trains projector + language model (or projector +
LoRA adapters on the LM) on conversations; AdamW, cosine schedule with linear warmup, loss on
assistant tokens only.

Design decisions:
- Freezing a part = `requires_grad_(False)` and no optimizer group; each trained part has its
  own group and learning rate (projector, lm, lora, vision).
- The loss of an optimizer step is the mean cross-entropy over every label token of the global
  batch (all micro-batches, all ranks): each micro-batch contributes sum / global_count, so
  gradient accumulation and DistributedDataParallel give the step a single-process run with
  the same global batch would take (HF's `num_items_in_batch` fix).
- Data order is a function of (seed, epoch): one permutation per epoch, cut into global
  batches, each rank taking its contiguous share. A resumed run recomputes it and skips the
  steps it already took, so it continues the same loss curve; RNG, optimizer and the trained
  tensors come back from the checkpoint (see state.py).
- The learning rate is a pure function of the step, set on the groups each step: no scheduler
  object whose state would need saving.
- Logits are computed only at label positions (hidden states are gathered first), so the
  vocabulary projection costs little on long image prompts.
- Only rank 0 writes files and prints.
- Another family than LLaVA: parts come from the model's `parts` (Qwen2-VL's merger is the
  projector), images from the family's processor and `model.encode`, per-example positions from
  the batch (M-RoPE), and the written checkpoint from the family's `hf_name` / `config_to_hf`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, FovealError
from ..models.vlm import VisionLanguageModel
from ..models.vlm import part_of as model_part_of
from .datasets import IGNORE_INDEX, ConversationDataset
from .lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, lora_parameters, merge_lora, save_adapter
from .state import list_checkpoints, load_state, optimizer_from_files, restore_rng, save_state

STAGES = ("align", "instruct")
# LLaVA-1.5's learning rates: stage 1 projector 1e-3; stage 2 2e-5 (LoRA: 2e-4, projector 2e-5).
DEFAULT_LR = {"align": {"projector": 1e-3}, "instruct": {"projector": 2e-5, "lm": 2e-5, "lora": 2e-4}}


@dataclass
class TrainConfig:
    stage: str
    model: str
    data: str
    output_dir: str
    image_folder: str | None = None
    # what trains
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    train_vision: bool = False
    freeze_projector: bool = False      # instruct: keep the projector fixed (LoRA-only / LM-only runs)
    lr_projector: float | None = None
    lr_lm: float | None = None
    lr_lora: float | None = None
    lr_vision: float = 2e-6
    weight_decay: float = 0.0
    # how
    batch_size: int = 8                 # per process and micro-step
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None        # overrides epochs
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    precision: str = "auto"             # auto | bf16 | fp32
    gradient_checkpointing: bool = False
    compile: bool = False               # forward and backward through torch.compile (~1.3x examples/s on CPU)
    max_length: int | None = None
    group_by_length: bool = False       # batches of similar length (less padding), as LLaVA's --group_by_modality_length
    seed: int = 0
    device: str = "cpu"
    # bookkeeping
    save_every: int = 0                 # checkpoint every N steps (0: only at the end / on stop)
    keep_checkpoints: int = 2
    resume: str | None = None           # "auto" (latest in output_dir) or a checkpoint folder
    stop_after: int | None = None       # stop after this many steps of this invocation (resume later)
    log_every: int = 1
    progress: bool = True
    merge: bool = False                 # LoRA: also write the merged model to OUTPUT/merged
    save_dtype: str | None = None       # float32 (default: as trained) | bfloat16 | float16
    plot: bool = True
    max_minutes: float | None = None    # time budget: the schedule decays by time too, and the run ends
                                        # (as finished) when it is spent; not resumable bit-exactly

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"unknown training stage {self.stage!r}; expected one of {', '.join(STAGES)}")
        if self.stage == "align" and (self.lora or self.train_vision or self.freeze_projector):
            raise ConfigError("stage 'align' trains only the projector; --lora, --train-vision and "
                              "--freeze-projector belong to 'instruct'")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max-steps must be >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision {self.precision!r} is not one of auto, bf16, fp32")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false, got {self.compile!r}")
        self.lora_targets = tuple(self.lora_targets)
        defaults = DEFAULT_LR[self.stage]
        for part in ("projector", "lm", "lora"):
            value = getattr(self, f"lr_{part}")
            if value is None:
                setattr(self, f"lr_{part}", defaults.get(part))
            elif value < 0:
                raise ConfigError(f"lr-{part} must be >= 0, got {value}")


@dataclass
class TrainResult:
    output_dir: Path
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    finished: bool = False
    model_dir: Path | None = None        # the full HF model written (full training, align, or --merge)
    adapter_dir: Path | None = None
    examples_per_s: float = 0.0
    steps_per_s: float = 0.0
    is_main: bool = True                 # rank 0 (the process that wrote the files)


# ---- distributed -----------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_reduce_sum(value: float, d: Dist) -> float:
    if not d.enabled:
        return value
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


# ---- schedule and parts ------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 0 (transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / (warmup + 1) if warmup else 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def budget_lr_factor(step: int, total: int, warmup: int, elapsed_s: float, budget_s: float | None) -> float:
    """`lr_factor` on a time budget: progress is the larger of steps done and time spent, so a run
    that will stop at its budget still ends its cosine decay there."""
    if not budget_s:
        return lr_factor(step, total, warmup)
    frac = max(step / total, elapsed_s / budget_s)
    return lr_factor(min(total - 1, int(frac * total)), total, warmup)


def part_of(name: str, model: nn.Module | None = None) -> str:
    """The trained part of a parameter: lora, or what the model's `parts` say (LLaVA's by default:
    vision_tower, multi_modal_projector + LLaVA-NeXT's image_newline, the LM; Qwen2-VL's merger is its
    projector)."""
    if ".lora_A." in name or ".lora_B." in name:
        return "lora"
    part = model_part_of(model.parts if model is not None else VisionLanguageModel.parts, name)
    return "lm" if part == "language_model" else part


def configure_trainable(model: nn.Module, cfg: TrainConfig) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Freeze / unfreeze parts for the stage; returns {part: [(name, param)]} of what trains."""
    if not getattr(model, "trainable", False):
        raise ConfigError(f"foveal train does not know how to train a {type(model).__name__} yet")
    model.requires_grad_(False)
    if cfg.lora:
        apply_lora(model, LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets))
    trained = set() if cfg.freeze_projector else {"projector"}
    if cfg.stage == "instruct":
        trained.add("lora" if cfg.lora else "lm")
        if cfg.train_vision:
            trained.add("vision")
    if not model.has_vision:
        trained.discard("projector")
        trained.discard("vision")
        if cfg.stage == "align":
            raise ConfigError("stage 'align' trains the projector, and this model has no vision tower")
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():       # tied weights appear once
        part = part_of(name, model)
        if cfg.lora and name == "image_newline":
            continue        # a PEFT adapter holds modules (modules_to_save), not a bare parameter: it stays
        if part in trained:
            p.requires_grad_(True)
            groups.setdefault(part, []).append((name, p))
    return groups


class CausalLMLoss(nn.Module):
    """(ids, labels, image mask, pixels) -> summed cross-entropy over label tokens, and their count.

    A module so DistributedDataParallel can wrap the whole forward."""

    def __init__(self, model: nn.Module, train_vision: bool):
        super().__init__()
        self.model = model
        self.train_vision = train_vision

    def forward(self, input_ids, labels, image_mask, pixels, views=None, sizes=None, positions=None):
        """views, sizes: an anyres model's views per image and (height, width) per image (see collate).
        positions: (3, B, T) M-RoPE positions per row (None: 0..T-1)."""
        m = self.model
        image_embeds = None
        if pixels is not None and not isinstance(m, VisionLanguageModel):
            # another family: its own encoder; frozen parts record no graph (no input there needs a gradient)
            image_embeds = torch.cat(m.encode(pixels))[None]            # (1, sum T_i, D)
        elif pixels is not None:
            with nullcontext() if self.train_vision else torch.no_grad():
                features = m.image_features(pixels)                     # (N, P, D_vision)
            image_embeds = m.project(features)                          # (N, P, D)
            if views is not None:       # each image's views -> its rows (T_i, D), as encode_anyres packs them
                rows = [m.pack_anyres(f, size) for f, size in zip(image_embeds.split(views), sizes)]
                image_embeds = torch.cat(rows)[None]                    # (1, sum T_i, D)
        embeds = m.embed(input_ids, image_mask if pixels is not None else None, image_embeds)  # (B, T, D)
        T = embeds.shape[1]
        if positions is None:
            positions = torch.arange(T, device=embeds.device)
        hidden = m.language_model(embeds, positions.to(embeds.device))  # (B, T, D)
        targets = labels[:, 1:]                                         # predict token t+1 at t
        keep = targets != IGNORE_INDEX
        logits = m.lm_head(hidden[:, :-1][keep]).float()               # (N_label, V)
        return F.cross_entropy(logits, targets[keep], reduction="sum")


# ---- the loop ----------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, vlm=None):
        self.cfg = cfg
        self.dist = init_distributed(cfg.device)
        device = cfg.device
        if cfg.device.startswith("cuda") and self.dist.enabled:
            device = f"cuda:{self.dist.local_rank}"
            torch.cuda.set_device(self.dist.local_rank)
        self.device = device
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed)
        if vlm is None:
            from ..api import load
            vlm = load(cfg.model, device=device, dtype="float32")
        self.vlm = vlm
        self.model = vlm.model
        self.model.language_model.drop_cache()
        self.dataset = ConversationDataset.from_file(cfg.data, vlm, cfg.image_folder, cfg.max_length)
        self.groups = configure_trainable(self.model, cfg)
        if not self.groups:
            raise ConfigError("nothing to train: every part is frozen")
        self.model.language_model.gradient_checkpointing = cfg.gradient_checkpointing
        lrs = {"projector": cfg.lr_projector, "lm": cfg.lr_lm, "lora": cfg.lr_lora, "vision": cfg.lr_vision}
        param_groups = []
        for part, named in self.groups.items():
            decay = [p for n, p in named if p.dim() >= 2]
            no_decay = [p for n, p in named if p.dim() < 2]
            for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
                if params:
                    param_groups.append({"params": params, "lr": lrs[part], "base_lr": lrs[part],
                                         "weight_decay": wd, "part": part})
        self.optimizer = torch.optim.AdamW(param_groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, foreach=False)

        self.global_batch = cfg.batch_size * cfg.grad_accum * self.dist.world
        n = len(self.dataset)
        if n < self.global_batch:
            raise ConfigError(f"the data has {n} examples, fewer than one global batch of {self.global_batch} "
                              f"(batch-size {cfg.batch_size} x grad-accum {cfg.grad_accum} x {self.dist.world} "
                              f"process(es)); lower --batch-size or --grad-accum")
        self.steps_per_epoch = n // self.global_batch
        self.total_steps = cfg.max_steps or max(1, int(self.steps_per_epoch * cfg.epochs))
        self.warmup = int(round(cfg.warmup_ratio * self.total_steps))
        self.precision = self._precision()
        self.step = 0
        self._order: tuple[int, list[int]] | None = None
        self.history: list[dict] = []
        if cfg.resume:
            self._resume(cfg.resume)
        has_text_only = any(not e.images for e in self.dataset.examples) and self.model.has_vision
        self.loss_module = CausalLMLoss(self.model, cfg.train_vision)
        self.forward = self.loss_module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.forward = DDP(self.loss_module, device_ids=[self.dist.local_rank] if "cuda" in device else None,
                               find_unused_parameters=has_text_only)
        if cfg.compile:
            if self.dist.enabled:
                raise ConfigError("--compile is not supported under torchrun yet; train without it there")
            # dynamic: every batch has its own length; the first steps compile (~20 s on 2 cores)
            self.forward = torch.compile(self.loss_module, dynamic=True)

    def _precision(self) -> torch.dtype:
        p = self.cfg.precision
        if p == "auto":
            from ..api import default_dtype
            return default_dtype(self.device)
        return torch.bfloat16 if p == "bf16" else torch.float32

    # -- data order
    def epoch_order(self, epoch: int) -> list[int]:
        """The example order of one epoch: a seeded permutation; with --group-by-length, cut into
        mega-batches of 50 global batches, each sorted by length, and the batches shuffled (transformers'
        LengthGroupedSampler): each batch pads to a near-equal length, the order stays random."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g).tolist()
        if self.cfg.group_by_length:
            B, lengths = self.global_batch, [len(e.input_ids) for e in self.dataset.examples]
            mega = 50 * B
            batches = []
            for i in range(0, self.steps_per_epoch * B, mega):
                part = sorted(perm[i:min(i + mega, self.steps_per_epoch * B)], key=lambda j: -lengths[j])
                batches += [part[j:j + B] for j in range(0, len(part), B)]
            shuffle = torch.randperm(len(batches), generator=g).tolist()
            perm = [j for b in shuffle for j in batches[b]]
        self._order = (epoch, perm)
        return perm

    def batch_indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for global step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.epoch_order(epoch)
        chunk = perm[k * self.global_batch:(k + 1) * self.global_batch]
        per_rank = self.cfg.batch_size * self.cfg.grad_accum
        mine = chunk[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]
        return [mine[j:j + self.cfg.batch_size] for j in range(0, per_rank, self.cfg.batch_size)]

    # -- checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p for part in self.groups.values() for n, p in part}

    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"stage": c.stage, "lora": c.lora, "lora_r": c.lora_r, "lora_targets": list(c.lora_targets),
                "train_vision": c.train_vision, "freeze_projector": c.freeze_projector,
                "global_batch": self.global_batch, "examples": len(self.dataset), "seed": c.seed,
                "total_steps": self.total_steps, **({"group_by_length": True} if c.group_by_length else {})}

    def save(self) -> Path | None:
        if not self.dist.main:
            return None
        info = {"step": self.step, "history": self.history, "fingerprint": self._fingerprint(),
                "config": _jsonable(asdict(self.cfg))}
        return save_state(self.out / "checkpoints" / f"step-{self.step:06d}", self.trainable_state(), self.optimizer,
                          info, keep=self.cfg.keep_checkpoints)

    def _resume(self, where: str) -> None:
        if where == "auto":
            found = list_checkpoints(self.out / "checkpoints")
            if not found:
                self._say(f"no checkpoint in {self.out / 'checkpoints'}: starting from step 0")
                return
            folder = found[-1]
        else:
            folder = Path(where)
        info, trainable, opt_tensors, rng = load_state(folder)
        mine, theirs = self._fingerprint(), info.get("fingerprint", {})
        diff = {k: (theirs.get(k), mine.get(k)) for k in {**theirs, **mine} if theirs.get(k) != mine.get(k)}
        if diff:
            raise ConfigError(f"checkpoint {folder} was made by a different run; differences (checkpoint, now): "
                              + ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items()))
        params = self.trainable_state()
        if set(params) != set(trainable):
            raise ConfigError(f"checkpoint {folder} holds other trained tensors than this run trains")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(trainable[name])
        optimizer_from_files(self.optimizer, opt_tensors, info["optimizer"])
        restore_rng(rng)
        self.step = int(info["step"])
        self.history = list(info.get("history", []))
        self._say(f"resumed from {folder} at step {self.step}")

    def _loss(self, b: dict, autocast) -> torch.Tensor:
        """The summed token loss of one micro-batch. A compiled forward that fails (no C++ compiler for
        Inductor, an unsupported op) says why once and the run goes on eagerly from that batch."""
        pixels = b["pixels"]
        if isinstance(pixels, (tuple, list)):       # another family's (pixel_values, grid_thw)
            pixels = tuple(t.to(self.device) for t in pixels)
        elif pixels is not None:
            pixels = pixels.to(self.device)
        args = (b["input_ids"].to(self.device), b["labels"].to(self.device), b["image_mask"].to(self.device),
                pixels, b.get("views"), b.get("sizes"), b.get("positions"))
        try:
            with autocast:
                return self.forward(*args)
        except Exception as e:   # noqa: BLE001 - any compilation failure; nothing was stepped yet
            if self.forward is self.loss_module or not self.cfg.compile:
                raise
            self.forward = self.loss_module
            self._say(f"torch.compile of the training step failed ({type(e).__name__}: {str(e)[:300]}); "
                      f"training eagerly from here on")
            with autocast:
                return self.forward(*args)

    # -- output
    def _say(self, text: str) -> None:
        if self.dist.main:
            print(text, file=sys.stderr, flush=True)

    def _write_outputs(self, result: TrainResult) -> None:
        cfg, vlm = self.cfg, self.vlm
        self.out.mkdir(parents=True, exist_ok=True)
        steps = [h["step"] for h in self.history]
        losses = [h["loss"] for h in self.history]
        (self.out / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history))
        (self.out / "train_config.json").write_text(json.dumps(_jsonable(asdict(cfg)), indent=2))
        if cfg.plot and steps:
            from .plot import plot_losses
            plot_losses(steps, losses, self.out / "loss.png", f"foveal train {cfg.stage}")
        save_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                      None: None}[cfg.save_dtype]
        self.model.eval()
        if cfg.lora:
            result.adapter_dir = save_adapter(self.model, LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                                                     cfg.lora_targets), self.out, str(cfg.model),
                                              save_projector="projector" in self.groups)
            if cfg.merge:
                merge_lora(self.model)
                result.model_dir = save_model(vlm, self.out / "merged", save_dtype)
        else:
            result.model_dir = save_model(vlm, self.out, save_dtype)

    def train(self) -> TrainResult:
        cfg, d = self.cfg, self.dist
        result = TrainResult(self.out, is_main=d.main)
        bar = _progress(self.total_steps, self.step, cfg.progress and d.main)
        pad_id = self.vlm.config.text.pad_token_id or 0
        self.model.train()
        autocast = (torch.autocast(torch.device(self.device).type, dtype=self.precision)
                    if self.precision != torch.float32 else nullcontext())
        stop_at = self.total_steps if cfg.stop_after is None else min(self.total_steps, self.step + cfg.stop_after)
        t_start, examples_done, steps_done = time.perf_counter(), 0, 0
        budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
        while self.step < stop_at:
            spent = time.perf_counter() - t_start
            if budget_s and spent >= budget_s:
                break
            factor = budget_lr_factor(self.step, self.total_steps, self.warmup, spent, budget_s)
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            micro = [self.dataset.collate(ix, pad_id) for ix in self.batch_indices(self.step)]
            local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
            global_tokens = _all_reduce_sum(float(local_tokens), d)
            loss_sum = 0.0
            for j, b in enumerate(micro):
                sync = j == len(micro) - 1
                ctx = self.forward.no_sync() if d.enabled and not sync else nullcontext()
                with ctx:
                    total = self._loss(b, autocast)
                    (total * (d.world / global_tokens)).backward()
                loss_sum += float(total.detach())
            params = [p for part in self.groups.values() for _, p in part]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm else 0.0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss = _all_reduce_sum(loss_sum, d) / global_tokens
            self.step += 1
            steps_done += 1
            examples_done += self.global_batch
            elapsed = time.perf_counter() - t_start
            rate = examples_done / elapsed if elapsed > 0 else 0.0
            self.history.append({"step": self.step, "loss": loss, "lr_factor": factor, "grad_norm": grad_norm,
                                 "tokens": int(global_tokens), "examples_per_s": round(rate, 3)})
            if not math.isfinite(loss):
                raise FovealError(f"the loss became {loss} at step {self.step}; lower the learning rate "
                                  f"(or use --precision fp32)")
            if self.step % cfg.log_every == 0 or self.step == stop_at:
                bar.update(self.step, loss, factor, rate)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save()
        bar.close()
        elapsed = time.perf_counter() - t_start
        result.steps_per_s = steps_done / elapsed if elapsed > 0 else 0.0
        result.examples_per_s = examples_done / elapsed if elapsed > 0 else 0.0
        result.steps = [h["step"] for h in self.history]
        result.losses = [h["loss"] for h in self.history]
        result.finished = self.step >= self.total_steps or bool(budget_s and elapsed >= budget_s)
        if not result.finished:
            self.save()
            self._say(f"stopped at step {self.step} of {self.total_steps}; continue with --resume auto")
        elif d.main:
            self._write_outputs(result)
            self._say(f"trained {self.step} steps ({result.examples_per_s:.1f} examples/s); wrote {self.out}")
        if d.enabled:
            import torch.distributed as dist
            dist.barrier()
        self.model.eval()
        return result


def train(cfg: TrainConfig, vlm=None) -> TrainResult:
    """Run one training stage; see TrainConfig. Under torchrun, every process calls this."""
    return Trainer(cfg, vlm).train()


def save_model(vlm, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """Write a (trained) model as an HF checkpoint folder that foveal and transformers load. LLaVA (and
    text LMs): weights/save.py's full config and llava-hf names. Any other family as `foveal quantize`
    writes it: tensors under the family's names (`hf_name`), its config.json (`config_to_hf` of the one it
    was read from), the tokenizer and template, and the source's other files (preprocessor_config.json ...)."""
    from safetensors.torch import save_file

    from ..quant.quantize import COPIED_SUFFIXES, NOT_COPIED
    from ..weights.save import hf_state_dict, save_checkpoint
    model, cfg, folder = vlm.model, vlm.config, Path(folder)
    files = dict(tokenizer_json=vlm.tokenizer.tok.to_str(), tokenizer_config=dict(vlm.tokenizer.config),
                 chat_template=vlm.prompt.template)
    if isinstance(model, VisionLanguageModel):
        return save_checkpoint(model, cfg, folder, dtype=dtype, image_processor=image_processor_dict(vlm), **files)
    folder.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(model, cfg, vlm.family.hf_name)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    hf = vlm.family.config_to_hf(cfg, getattr(vlm, "raw_config", None) or {})
    hf["dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    (folder / "tokenizer.json").write_text(files["tokenizer_json"])
    (folder / "tokenizer_config.json").write_text(json.dumps(files["tokenizer_config"], indent=2))
    (folder / "chat_template.jinja").write_text(files["chat_template"])
    written = {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    source = Path(vlm.path)
    for f in sorted(source.iterdir()) if source.is_dir() else ():
        if (f.is_file() and f.suffix in COPIED_SUFFIXES and f.name not in NOT_COPIED | written
                and f.resolve() != (folder / f.name).resolve()):
            shutil.copyfile(f, folder / f.name)
    return folder


def image_processor_dict(vlm) -> dict | None:
    """The checkpoint's own preprocessor config (so the trained model preprocesses the same)."""
    from ..models.families.llava import image_processor_of
    if vlm.image_config is None:
        return None
    path = Path(vlm.path)
    found = image_processor_of(path) if path.is_dir() else None
    c = vlm.image_config
    base = dict(found) if found else {}
    if not found:
        base = {"image_processor_type": "CLIPImageProcessor", "size": c.size, "crop_size": c.crop_size,
                "do_center_crop": c.do_center_crop, "do_resize": c.do_resize, "do_rescale": c.do_rescale,
                "do_normalize": c.do_normalize, "rescale_factor": c.rescale_factor,
                "image_mean": list(c.image_mean), "image_std": list(c.image_std), "resample": c.resample}
    return base


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, Path):
        return str(d)
    return d


class _progress:
    """tqdm when installed (and wanted), else a line every so often on stderr."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled, self.total, self.bar = enabled, total, None
        self.last_print = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, step: int, loss: float, lr: float, rate: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2f}x", ex_s=f"{rate:.1f}", refresh=True)
            return
        now = time.perf_counter()
        if now - self.last_print > 2.0 or step == self.total:
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2f}x {rate:.1f} examples/s",
                  file=sys.stderr, flush=True)
            self.last_print = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
