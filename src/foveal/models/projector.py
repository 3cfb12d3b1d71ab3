"""Projectors from vision features to the language model's embedding space.

- `mlp2x_gelu`: Linear -> activation -> Linear, llava-hf's `LlavaMultiModalProjector`
  (names `linear_1`, `linear_2`; the original repo's `mm_projector.0/.2` are renamed to these).
- `linear`: one Linear (the original LLaVA v1 projector), named `linear_1`.
The activation is the exact (erf) GELU unless the config says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ProjectorConfig
from .vision import ACTIVATIONS


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.kind = cfg.kind
        self.linear_1 = nn.Linear(cfg.in_features, cfg.out_features, bias=cfg.bias)
        if cfg.kind == "mlp2x_gelu":
            act = cfg.hidden_act if cfg.hidden_act in ACTIVATIONS else "gelu"
            self.act = ACTIVATIONS[act]
            self.linear_2 = nn.Linear(cfg.out_features, cfg.out_features, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(self.act(x))
        return x
