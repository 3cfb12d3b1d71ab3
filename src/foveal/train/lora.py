"""LoRA adapters on the language model's linear layers, in PEFT's file format.

Mirrors peft's `tuners/lora/layer.py` (`Linear.forward`: y = W x + B(A(dropout(x))) * alpha / r,
A Kaiming-uniform, B zero) and its save format, so an adapter written here loads with
`PeftModel.from_pretrained(LlavaForConditionalGeneration..., folder)` and one written by PEFT
loads here.

Design decisions:
- A `LoRALinear` wraps the original `nn.Linear` as `.base_layer` and adds `lora_A`/`lora_B`;
  the base weight is frozen. Merging writes W + B A * scale back into a plain `nn.Linear`.
- Only the language model is adapted: `target_modules` names leaf modules (q_proj, v_proj ...)
  and is written to adapter_config.json as a regex anchored to the language model, because
  PEFT matches a plain list against every module, vision tower included.
- Tensor names follow what peft writes for transformers' current `LlavaForConditionalGeneration`
  (`base_model.model.model.language_model.layers.N.self_attn.q_proj.lora_A.weight`); the older
  layout (`base_model.model.language_model.model.layers...`) and text-only models
  (`base_model.model.model.layers...`) are read too. Qwen2-VL's are the same
  (`Qwen2VLForConditionalGeneration` nests its LM the same way); its trained projector, the
  merger, is `modules_to_save: ["merger"]` under `base_model.model.model.visual.merger.*`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, WeightsError

DEFAULT_TARGETS = ("q_proj", "v_proj")
LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.target_modules if t not in LM_TARGETS]
        if unknown or not self.target_modules:
            raise ConfigError(f"LoRA target module(s) {unknown or '(none)'} are not language-model linears; "
                              f"choose from {', '.join(LM_TARGETS)} (or 'all-linear')")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def parse_targets(text: str) -> tuple[str, ...]:
    if text.strip() in ("all-linear", "all"):
        return LM_TARGETS
    return tuple(t.strip() for t in text.split(",") if t.strip())


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base
        self.r, self.scale = r, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))     # peft's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))).to(y.dtype) * self.scale

    def merged(self) -> nn.Linear:
        base = self.base_layer
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale
            base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        return base


def _lm_linears(model: nn.Module, targets) -> list[tuple[nn.Module, str, str]]:
    """(parent, child name, full name) of every targeted linear in the language model."""
    found = []
    for name, module in model.language_model.named_modules():
        for child_name, child in module.named_children():
            if child_name in targets and isinstance(child, (nn.Linear, LoRALinear)):
                full = f"language_model.{name}.{child_name}" if name else f"language_model.{child_name}"
                found.append((module, child_name, full))
    return found


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the targeted LM linears in place; returns their module names. The base stays frozen."""
    model.requires_grad_(False)
    found = _lm_linears(model, cfg.target_modules)
    if not found:
        raise ConfigError(f"no language-model linear named {', '.join(cfg.target_modules)} was found")
    for parent, child_name, _ in found:
        child = getattr(parent, child_name)
        if isinstance(child, LoRALinear):
            raise ConfigError("this model already has LoRA adapters")
        if not isinstance(child.weight, torch.Tensor) or child.weight.is_meta:
            raise ConfigError("LoRA needs a float model (not quantized) with its weights loaded")
        wrapped = LoRALinear(child, cfg.r, cfg.alpha, cfg.dropout)
        wrapped.train(child.training)       # a model loaded for inference keeps dropout off
        setattr(parent, child_name, wrapped)
    return [full for _, _, full in found]


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and restore plain nn.Linear modules."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
                count += 1
    return count


# ---- PEFT file format ------------------------------------------------------------------
def projector_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's projector modules by name (its `parts`): LLaVA's multi_modal_projector, Qwen2-VL's
    visual.merger. A bare parameter (LLaVA-NeXT's image_newline) is no PEFT module and stays out."""
    found = {}
    for name, part in getattr(model, "parts", {}).items():
        if part == "projector":
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            found[name] = module
    return found


def _peft_key(name: str, has_vision: bool) -> str:
    """`language_model.layers.0.self_attn.q_proj.lora_A.weight` -> PEFT's name for it."""
    if not name.startswith("language_model."):       # a projector's tensor, a modules_to_save entry
        return "base_model.model.model." + name
    rest = name[len("language_model."):]
    prefix = "base_model.model.model.language_model." if has_vision else "base_model.model.model."
    return prefix + rest


# (PEFT prefix, foveal prefix); transformers >= 4.52 layout first, then the older one.
_PEFT_PREFIXES = (("base_model.model.model.language_model.", "language_model."),
                  ("base_model.model.language_model.model.", "language_model."),
                  ("base_model.model.model.multi_modal_projector.", "multi_modal_projector."),
                  ("base_model.model.multi_modal_projector.", "multi_modal_projector."),
                  ("base_model.model.model.visual.", "visual."),          # Qwen2-VL's merger
                  ("base_model.model.visual.", "visual."),
                  ("base_model.model.model.", "language_model."))


def _from_peft_key(key: str) -> str:
    key = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key).replace(".modules_to_save.default.", ".")
    for prefix, ours in _PEFT_PREFIXES:
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    raise WeightsError(f"adapter tensor {key!r} is on neither the language model nor the projector")


def target_regex(targets) -> str:
    return rf".*language_model.*\.({'|'.join(targets)})" if targets else ""


def save_adapter(model: nn.Module, cfg: LoRAConfig, folder: Path, base_model: str,
                 save_projector: bool = False) -> Path:
    """adapter_config.json + adapter_model.safetensors; a trained projector goes in as PEFT's
    `modules_to_save` (whole tensors that replace the base's)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    has_vision = getattr(model, "has_vision", False)
    named = dict(lora_parameters(model))
    projectors = projector_modules(model) if save_projector and has_vision else {}
    for prefix, module in projectors.items():
        named |= {f"{prefix}.{k}": v for k, v in module.state_dict().items()}
    tensors = {_peft_key(n, has_vision): p.detach().contiguous() for n, p in named.items()}
    from ..models.vlm import VisionLanguageModel
    base_class = ("LlavaForConditionalGeneration" if isinstance(model, VisionLanguageModel)
                  else getattr(model.cfg, "architecture", None))
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": None if has_vision else "CAUSAL_LM",
        "base_model_name_or_path": base_model, "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": target_regex(cfg.target_modules) if has_vision else list(cfg.target_modules),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        # PEFT matches modules_to_save against the end of a module's name: `merger` is model.visual.merger
        "modules_to_save": [p.rsplit(".", 1)[-1] for p in projectors] or None,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
        "auto_mapping": {"base_model_class": base_class if has_vision else None,
                         "parent_library": "transformers"} if has_vision else None,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def read_adapter_config(folder: Path) -> LoRAConfig:
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.exists() or not (folder / ADAPTER_WEIGHTS).exists():
        raise WeightsError(f"{folder} is not a LoRA adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from None
    if d.get("peft_type") != "LORA":
        raise WeightsError(f"{path}: peft_type is {d.get('peft_type')!r}; only LORA adapters are supported")
    for unsupported in ("use_dora", "use_rslora"):
        if d.get(unsupported):
            raise WeightsError(f"{path}: {unsupported} adapters are not supported")
    if d.get("rank_pattern") or d.get("alpha_pattern"):
        raise WeightsError(f"{path}: per-layer rank_pattern / alpha_pattern are not supported")
    extra = [m for m in d.get("modules_to_save") or [] if m not in ("multi_modal_projector", "merger")]
    if extra:
        raise WeightsError(f"{path}: modules_to_save {extra} are not supported (only the projector: "
                           f"multi_modal_projector, or Qwen2-VL's merger)")
    targets = d.get("target_modules") or []
    if isinstance(targets, str):        # a regex: pull out the leaf names it lists
        targets = [t for t in LM_TARGETS if re.search(rf"\b{t}\b", targets)]
    return LoRAConfig(r=int(d["r"]), alpha=float(d.get("lora_alpha", d["r"])), dropout=float(d.get("lora_dropout", 0.0)),
                      target_modules=tuple(targets))


def load_adapter(model: nn.Module, folder: Path) -> LoRAConfig:
    """Wrap the model's linears as the adapter says and load its tensors (strictly)."""
    cfg = read_adapter_config(folder)
    tensors = load_file(Path(folder) / ADAPTER_WEIGHTS)
    wanted = {_from_peft_key(k): v for k, v in tensors.items()}
    apply_lora(model, cfg)
    params = dict(lora_parameters(model))
    if any(not k.startswith("language_model.") for k in wanted):
        if not getattr(model, "has_vision", False):
            raise WeightsError(f"adapter {folder} holds projector weights but the model has no vision tower")
        for prefix, module in projector_modules(model).items():
            params |= {f"{prefix}.{k}": v for k, v in module.state_dict().items()}
    missing = sorted(set(params) - set(wanted))
    unexpected = sorted(set(wanted) - set(params))
    if missing or unexpected:
        raise WeightsError(f"adapter {folder} does not fit this model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if wanted[name].shape != p.shape:
                raise WeightsError(f"adapter tensor {name} has shape {tuple(wanted[name].shape)}, the model "
                                   f"needs {tuple(p.shape)}")
            p.copy_(wanted[name].to(p.dtype))
    return cfg


def merge_adapter(base, adapter: Path, out: Path, dtype: str | None = None) -> Path:
    """Load base (a model reference), apply the adapter, fold it in, write an HF checkpoint."""
    from ..api import load
    from .trainer import save_model
    vlm = load(base, dtype="float32")
    load_adapter(vlm.model, Path(adapter))
    merge_lora(vlm.model)
    save_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, None: None}
    if dtype not in save_dtype:
        raise ConfigError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    return save_model(vlm, Path(out), save_dtype[dtype])
