"""Mllama's vision model: tiles of one image through a local encoder, then a gated global encoder.

Mirrors transformers 5.25's models/mllama/modeling_mllama.py (MllamaVisionModel and its pieces), the
same operations in the same order, module names as the checkpoint's (`vision_model.*`).

Design decisions:
- An image arrives as `max_num_tiles` tiles (padding tiles are zeros, masked by aspect_ratio_mask)
  with its aspect-ratio id; tile embeddings (pre / post) and the gated position embedding are looked
  up by that id, as in HF.
- The padding mask is HF's `_prepare_aspect_ratio_attention_mask`, quirks included: only pairs of two
  padding positions are masked, and the padded patch rows are taken from the end of every tile.
- The output is the global encoder's last state with the local encoder's `intermediate_layers_indices`
  outputs concatenated along the features: (images, tiles, patches + 1, hidden * (1 + k)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MllamaVisionConfig:
    hidden_size: int
    num_hidden_layers: int
    num_global_layers: int
    attention_heads: int
    intermediate_size: int
    vision_output_dim: int
    image_size: int
    patch_size: int
    norm_eps: float
    max_num_tiles: int
    intermediate_layers_indices: list[int]
    supported_aspect_ratios: list[list[int]]
    num_channels: int = 3

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)

    @property
    def num_patches(self) -> int:
        """Tokens of one tile: its patches and the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


class AspectRatioEmbedding(nn.Module):
    """MllamaPrecomputedAspectRatioEmbedding: one learnt vector per tile, by the image's aspect-ratio id."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.max_num_tiles, self.hidden_size = cfg.max_num_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, 1, self.hidden_size)
        return x + e * self.gate.tanh()


class GatedPositionEmbedding(nn.Module):
    """MllamaPrecomputedPositionEmbedding: a position table shared by the tiles, blended by a tanh gate with
    a per-aspect-ratio table of every tile's positions."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.max_num_tiles, self.num_patches, self.hidden_size = cfg.max_num_tiles, cfg.num_patches, cfg.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.empty(self.num_patches, self.hidden_size))
        self.tile_embedding = nn.Embedding(cfg.max_aspect_ratio_id + 1,
                                           cfg.max_num_tiles * self.num_patches * self.hidden_size)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        x = x + ((1 - self.gate.tanh()) * self.embedding).view(1, 1, self.num_patches, self.hidden_size)
        tiles = self.tile_embedding(aspect_ratio_ids).reshape(x.shape[0], self.max_num_tiles, self.num_patches,
                                                              self.hidden_size)
        return x + self.gate.tanh() * tiles


class VisionAttention(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.attention_heads, cfg.hidden_size // cfg.attention_heads
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))          # (B, H, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig, gated: bool):
        super().__init__()
        self.gated = gated
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x, mask):
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig, n_layers: int, gated: bool):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg, gated) for _ in range(n_layers))

    def forward(self, x, mask) -> list[torch.Tensor]:
        """Every layer's output, in order."""
        states = []
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        return states


def aspect_ratio_attention_mask(aspect_ratio_mask: torch.Tensor, num_patches: int, target_length: int,
                                dtype) -> torch.Tensor:
    """HF's _prepare_aspect_ratio_attention_mask: (N, tiles) -> additive (N, 1, tiles * L, tiles * L)."""
    N, tiles = aspect_ratio_mask.shape
    m = aspect_ratio_mask.view(N, tiles, 1, 1).to(dtype).repeat(1, 1, target_length, 1)
    m[:, :, -(target_length - num_patches):] = 0        # as HF: with no padding rows this zeroes every row
    m = (1 - m).reshape(N, tiles * target_length, 1)
    return (m @ m.transpose(-1, -2) * torch.finfo(dtype).min).unsqueeze(1)


class MllamaVisionModel(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.gated_positional_embedding = GatedPositionEmbedding(cfg)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(d)
        self.layernorm_post = nn.LayerNorm(d)
        self.transformer = VisionEncoder(cfg, cfg.num_hidden_layers, gated=False)
        self.global_transformer = VisionEncoder(cfg, cfg.num_global_layers, gated=True)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, tiles, 3, S, S), aspect_ratio_ids (N,), aspect_ratio_mask (N, tiles) ->
        (N, tiles, patches + 1, vision_output_dim)."""
        N, tiles, C, H, W = pixel_values.shape
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.reshape(N * tiles, C, H, W).to(w.device, w.dtype))
        x = x.flatten(2).transpose(1, 2)                                        # (N * tiles, P, D)
        P, D = x.shape[1:]
        ids = aspect_ratio_ids.reshape(N, -1).to(w.device)
        x = self.pre_tile_positional_embedding(x.reshape(N, tiles, P, D), ids)
        x = x.reshape(N * tiles, P, D)
        x = torch.cat([self.class_embedding.expand(N * tiles, 1, D), x], dim=1)   # class token first
        L = P + 1
        x = self.gated_positional_embedding(x.reshape(N, tiles, L, D), ids)
        x = self.layernorm_pre(x)
        pad = (8 - L % 8) % 8                        # HF pads every tile to a multiple of 8 tokens
        x = F.pad(x, (0, 0, 0, pad))
        Lp = L + pad
        mask = aspect_ratio_attention_mask(aspect_ratio_mask.reshape(N, -1).to(w.device), self.cfg.num_patches, Lp,
                                           x.dtype)
        local = self.transformer(x.view(N, tiles * Lp, D), mask)
        x = self.layernorm_post(local[-1]).reshape(N, tiles, Lp, D)
        x = self.post_tile_positional_embedding(x, ids).reshape(N, tiles * Lp, D)
        x = self.global_transformer(x, mask)[-1].reshape(N, tiles, Lp, D)[:, :, :L]
        inter = torch.stack([local[i] for i in self.cfg.intermediate_layers_indices], dim=-1)
        inter = inter.reshape(N, tiles, Lp, -1)[:, :, :L]
        return torch.cat([x, inter], dim=-1)
