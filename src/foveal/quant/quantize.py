"""Swap a model's `nn.Linear`s for quantized ones, describe the result, save and reload it.

Design decisions:
- The language model's linears and the LM head are quantized; the token embedding is not (a
  tied head gets its own quantized copy, as llama.cpp does); the vision tower and projector stay
  in the float dtype unless `vision=` names a mode ("the encoder is sensitive to quantization").
- Modules are swapped one at a time, so the float weight of a layer is dropped as soon as its
  quantized replacement exists: memory never holds two full copies. Quantizing at load goes
  further (`quantize_from_checkpoint`): each layer is built from its checkpoint tensor on the
  still-empty model and that tensor's file pages are dropped, so the float model never exists.
- A linear whose input size the int4 group does not divide is quantized to int8 instead; the
  config's `modules` map records the mode of every quantized module, so loading rebuilds exactly.
- config.json gains `"quantization": {"method": "foveal", "mode", "group_size", "symmetric",
  "vision", "modules": {name: mode}}`; the checkpoint holds each module's portable buffers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ConfigError
from .linear import GROUP_SIZES, QUANTIZED, Int4Linear, Int8Linear

MODES = ("int8", "int4")
DEFAULT_GROUP = 64
LM_PREFIXES = ("language_model.", "lm_head")
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")


def parse_quant(spec: str) -> tuple[str, int]:
    """"int8" | "int4" | "int4-g32" (group 32/64/128/256) -> (mode, group_size)."""
    m = re.fullmatch(r"(int8|int4)(?:-g(\d+))?", str(spec).strip().lower())
    if not m or (m.group(1) == "int8" and m.group(2)):
        raise ConfigError(f"quant={spec!r} is not supported; use int8, int4 or int4-gN with N in "
                          f"{', '.join(map(str, GROUP_SIZES))}")
    group = int(m.group(2)) if m.group(2) else DEFAULT_GROUP
    check_group_size(group)
    return m.group(1), group


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group size {group_size} is not supported; use one of "
                          f"{', '.join(map(str, GROUP_SIZES))}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _part(model: nn.Module, name: str) -> str | None:
    """Which part a module belongs to: the family's model says (`parts`, by top-level name)."""
    parts = getattr(model, "parts", None)
    if parts is not None:
        return parts.get(name.split(".", 1)[0])
    return "language_model" if name.startswith(LM_PREFIXES) else "vision" if name.startswith(VISION_PREFIXES) else None


def plan_modules(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP,
                 vision: str | None = None) -> dict[str, str]:
    """name -> "int8" | "int4" for every linear that `quantize_model` would quantize."""
    if mode not in MODES:
        raise ConfigError(f"quantization mode {mode!r} is not supported; use int8 or int4")
    if vision not in (None, *MODES):
        raise ConfigError(f"vision quantization {vision!r} is not supported; use int8 or int4 (or none)")
    if mode == "int4" or vision == "int4":
        check_group_size(group_size)
    plan = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        part = _part(model, name)
        want = mode if part == "language_model" else vision if part in ("vision", "projector") else None
        if want == "int4" and mod.in_features % group_size:
            want = "int8"
        # The output head stays int8 under int4, as llama.cpp keeps `output` at Q6_K/Q8_0: every
        # logit goes through it. Measured on the bundled model (70 held-out questions, whole greedy
        # answers identical to float32): int4 head 68.6 %, int8 head 91.4 %.
        if want == "int4" and name == "lm_head":
            want = "int8"
        if want:
            plan[name] = want
    return plan


def quantize_model(model: nn.Module, mode: str = "int8", group_size: int = DEFAULT_GROUP, vision: str | None = None,
                   symmetric: bool = False, fast: bool = True) -> dict[str, str]:
    """Quantize `model` in place (LM linears + head; vision too if `vision`); returns the module map."""
    plan = plan_modules(model, mode, group_size, vision)
    for name, want in plan.items():
        linear = model.get_submodule(name)
        with torch.no_grad():
            q = (Int4Linear.from_linear(linear, group_size, symmetric) if want == "int4"
                 else Int8Linear.from_linear(linear))
        q.fast = fast
        q.pack()
        _set_module(model, name, q)
        del linear
    done = {n: m.mode for n, m in quantized_modules(model).items()}    # with any quantized at load
    model.quantization = {"method": "foveal", "mode": mode, "group_size": group_size if "int4" in done.values()
                          else None, "symmetric": symmetric, "vision": vision, "modules": done}
    return done


def quantize_from_checkpoint(model: nn.Module, sources: dict, dtype: torch.dtype, mode: str,
                             group_size: int = DEFAULT_GROUP, symmetric: bool = False,
                             skip: frozenset[str] = frozenset()) -> dict:
    """Quantize-at-load without the float model: on a model still on the meta device, build each
    planned linear straight from its checkpoint tensor, one at a time, and drop that tensor's file
    pages before the next (`SafetensorsFile.release`), so memory peaks at the quantized model + the
    parts that stay float + one layer, never the whole float model. Returns `sources` less the
    tensors used; `load_into` loads the rest. Modules in `skip` (a tied head: its weight is the
    embedding, loaded later) are left for `quantize_model`."""
    plan = {n: m for n, m in plan_modules(model, mode, group_size).items() if n not in skip}
    used = set()
    for name, want in plan.items():
        linear = model.get_submodule(name)
        keys = [f"{name}.weight"] + ([f"{name}.bias"] if linear.bias is not None else [])
        if any(k not in sources for k in keys):
            continue                     # load_into names what is missing
        if any(tuple(sources[k][0].tensors[sources[k][1]].shape) != tuple(getattr(linear, k.rpartition(".")[2]).shape)
               for k in keys):
            continue                     # load_into reports the shape mismatch (nothing taken from sources yet)
        tensors = [st.get(stored, dtype) for st, stored in (sources[k] for k in keys)]
        float_linear = nn.Linear(linear.in_features, linear.out_features, bias=len(tensors) > 1, device="meta")
        float_linear.weight = nn.Parameter(tensors[0], requires_grad=False)
        if len(tensors) > 1:
            float_linear.bias = nn.Parameter(tensors[1], requires_grad=False)
        with torch.no_grad():
            q = (Int4Linear.from_linear(float_linear, group_size, symmetric) if want == "int4"
                 else Int8Linear.from_linear(float_linear))
        q.pack()
        _set_module(model, name, q)
        del float_linear, tensors
        for k in keys:
            st, stored = sources[k]
            if hasattr(st, "release"):
                st.release(stored)
            used.add(k)
        _trim_heap()
    return {k: v for k, v in sources.items() if k not in used}


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). Each layer's temporaries are
    freed, but glibc keeps them in its heap, and over ~170 layers the fragments add up to
    hundreds of MB of peak RSS; elsewhere this is a no-op."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def set_fast_path(model: nn.Module, enabled: bool) -> None:
    """Use the packed CPU kernels for decode (True) or force dequantize + matmul everywhere (False)."""
    for mod in model.modules():
        if isinstance(mod, QUANTIZED):
            mod.fast = enabled
            if enabled:
                mod.pack()


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZED)}


# ---- checkpoints --------------------------------------------------------------------------
def read_quant_config(raw: dict) -> dict | None:
    """The validated `quantization` section of a config.json, or None when absent."""
    q = raw.get("quantization")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("method") != "foveal" or not isinstance(q.get("modules"), dict):
        raise ConfigError("config.json's quantization section is not one foveal wrote (needs method 'foveal' "
                          "and a modules map)")
    for name, mode in q["modules"].items():
        if mode not in MODES:
            raise ConfigError(f"config.json's quantization names mode {mode!r} for {name}; use int8 or int4")
    if "int4" in q["modules"].values():
        check_group_size(q.get("group_size"))
    return q


def swap_to_quantized(model: nn.Module, qcfg: dict, dtype: torch.dtype) -> None:
    """Replace the linears named in `qcfg` by empty quantized modules (call on the meta device)."""
    for name, mode in qcfg["modules"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"config.json's quantization names module {name!r}, which this model lacks") from None
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"config.json's quantization names {name!r}, which is not a linear layer")
        args = (linear.in_features, linear.out_features, linear.bias is not None)
        device = linear.weight.device
        if mode == "int4":
            if linear.in_features % qcfg["group_size"]:
                raise ConfigError(f"{name}: group size {qcfg['group_size']} does not divide its "
                                  f"{linear.in_features} inputs")
            q = Int4Linear(*args, group_size=qcfg["group_size"], dtype=dtype, device=device)
        else:
            q = Int8Linear(*args, dtype=dtype, device=device)
        _set_module(model, name, q)
    model.quantization = qcfg


def checkpoint_state_dict(model: nn.Module, cfg, family=None) -> dict[str, torch.Tensor]:
    """HF-named tensors of a (quantized) model, the quantized LM head included even when tied. family: the
    model's family module (its hf_name map); LLaVA's by default."""
    from ..models.families import llava
    from ..weights.save import hf_state_dict
    name_of = (family or llava).hf_name
    sd = hf_state_dict(model, cfg, name_of)
    head = model.lm_head
    if isinstance(head, QUANTIZED):
        names = {name_of(f"lm_head.{k}", cfg): v for k, v in head.state_dict().items()}
        sd = {k: v for k, v in sd.items() if k != name_of("lm_head.weight", cfg)}
        sd |= {k: v.detach().contiguous() for k, v in names.items()}
    return sd


COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model")
NOT_COPIED = {"config.json", "model.safetensors.index.json"}


def save_quantized(model: nn.Module, cfg, source: Path, out: Path, raw_config: dict | None = None,
                   family=None) -> Path:
    """Write a quantized model as safetensors + config.json (with `quantization`) + the source's
    tokenizer / processor / template files, loadable by `foveal.load(out)` alone. family: the model's
    family module (its checkpoint names and config.json); LLaVA's by default."""
    from safetensors.torch import save_file

    from ..models.families import llava
    family = family or llava
    qcfg = getattr(model, "quantization", None)
    if not qcfg:
        raise ConfigError("the model is not quantized: call quantize_model first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = checkpoint_state_dict(model, cfg, family)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt", "quantization": json.dumps(qcfg)})
    hf = family.config_to_hf(cfg, raw_config or {})
    floats = [v.dtype for v in sd.values() if v.is_floating_point()]
    hf["dtype"] = str(floats[0] if floats else torch.float32).replace("torch.", "")
    hf["quantization"] = qcfg
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    source = Path(source)
    for f in source.iterdir() if source.is_dir() else ():
        if f.is_file() and f.suffix in COPIED_SUFFIXES and f.name not in NOT_COPIED and f.resolve() != (out / f.name).resolve():
            shutil.copyfile(f, out / f.name)
    return out
