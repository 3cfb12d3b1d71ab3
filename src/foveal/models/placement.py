"""One model split between a GPU and the CPU: `--gpu-layers N`, as llama.cpp's `-ngl N`.

    load(ref, device="cuda", gpu_layers=20)      # the last 20 decoder layers on the GPU

Design decisions:
- The last N decoder layers, the final norm, the head, the vision tower, the projector (and
  LLaVA-NeXT's image_newline) go on the GPU; the token embedding and the first L - N layers stay
  on the CPU, which is what `plan` counts when it suggests N. llama.cpp offloads the last layers
  and keeps the embedding on the CPU too. A forward crosses from CPU to GPU once, before layer
  L - N; image features cross the other way once, into the CPU token embeddings.
- Tensors are placed as they are read from the checkpoint (`device_of(name)`), so the GPU never
  holds more than its share; `place` then moves what was made elsewhere (layers quantized from
  the file on the CPU) and gives a tied head its own GPU copy of the embedding matrix.
- Each layer's KV cache is allocated on that layer's device (`TextModel.setup_cache`); the engine
  feeds token ids and positions on the embedding's device and samples on the head's.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..errors import ConfigError

_LAYER = re.compile(r"language_model\.layers\.(\d+)\.")


def check_gpu_layers(gpu_layers, device: str, n_layers: int) -> int | None:
    """The number of layers to offload, validated; None when the whole model goes on `device`."""
    if gpu_layers is None:
        return None
    if isinstance(gpu_layers, bool) or not isinstance(gpu_layers, int) or gpu_layers < 0:
        raise ConfigError(f"gpu_layers must be an integer >= 0, got {gpu_layers!r}")
    if torch.device(device).type == "cpu":
        raise ConfigError(f"gpu_layers={gpu_layers} splits a model between a GPU and the CPU; it needs "
                          f"device='cuda' (this load is on the CPU, where every layer already runs)")
    return None if gpu_layers >= n_layers else gpu_layers


def device_of(name: str, n_layers: int, gpu_layers: int, device) -> str:
    """Where the tensor `name` (a foveal state-dict name) lives when `gpu_layers` layers are offloaded."""
    if name.startswith("language_model.embed_tokens.") or name == "language_model.inv_freq":
        return "cpu"        # the embedding, and RoPE's frequencies beside the positions fed with it
    m = _LAYER.match(name)
    if m is not None and int(m.group(1)) < n_layers - gpu_layers:
        return "cpu"
    return str(device)


def place(model: nn.Module, device, gpu_layers: int) -> None:
    """Move every parameter and buffer of a loaded model to `device_of` its name (no copy where it
    already is). A head tied to the CPU embedding becomes its own tensor on the GPU."""
    n_layers = model.cfg.text.num_hidden_layers
    for prefix, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for key, t in list(store.items()):
                if t is None:
                    continue
                want = torch.device(device_of(f"{prefix}.{key}" if prefix else key, n_layers, gpu_layers, device))
                if t.is_meta and want.type != "meta":
                    continue        # not filled yet (RoPE's inv_freq: init_rope makes it where it belongs)
                if t.device != want:
                    moved = t.detach().to(want)
                    store[key] = nn.Parameter(moved, requires_grad=False) if store is module._parameters else moved
