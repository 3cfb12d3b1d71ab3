"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder `checkpoints/step-000120/` holds
- `trainable.safetensors`: the parameters that train (by module name), fp32 as they are;
- `optimizer.safetensors`: every tensor of the optimizer's state, as `state.{index}.{name}`;
- `rng.safetensors`: the torch CPU (and CUDA) generator states;
- `state.json`: step, epoch, the optimizer's param groups and non-tensor state, the loss
  history and the run's configuration.
`torch.save` would pickle; these files can be read by anything and cannot run code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import WeightsError

STATE_JSON = "state.json"


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for idx, entry in sd["state"].items():
        plain[str(idx)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().clone()
            else:
                plain[str(idx)][name] = value
    return tensors, {"state": plain, "param_groups": sd["param_groups"]}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_state(folder: Path, trainable: dict[str, torch.Tensor], optimizer, info: dict, keep: int | None = None) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    opt_tensors, opt_meta = optimizer_to_files(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file(rng_tensors(), tmp / "rng.safetensors")
    (tmp / STATE_JSON).write_text(json.dumps(info | {"optimizer": opt_meta}, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)         # a crash mid-write never leaves a half checkpoint under the real name
    if keep:
        for old in list_checkpoints(folder.parent)[:-keep]:
            shutil.rmtree(old)
    return folder


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_JSON).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(info incl. optimizer meta, trainable tensors, optimizer tensors, rng tensors)."""
    folder = Path(folder)
    need = ["state.json", "trainable.safetensors", "optimizer.safetensors", "rng.safetensors"]
    missing = [n for n in need if not (folder / n).exists()]
    if missing:
        raise WeightsError(f"{folder} is not a complete training checkpoint (missing {', '.join(missing)})")
    try:
        info = json.loads((folder / STATE_JSON).read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{folder / STATE_JSON} is not valid JSON: {e}") from None
    return (info, load_file(folder / "trainable.safetensors"), load_file(folder / "optimizer.safetensors"),
            load_file(folder / "rng.safetensors"))
