"""Qwen3-VL vision tower: pixel patches + grid_thw -> merged embeddings and DeepStack features.

Mirrors transformers 5.25 `Qwen3VLVisionModel` (models/qwen3_vl/modeling_qwen3_vl.py) with the grid
helpers of transformers/vision_utils.py (`get_vision_interpolation_indices_and_weights`,
`get_vision_position_ids`, `get_vision_cu_seqlens`).

Design decisions
- What equals Qwen2-VL's is imported from the qwen2_vl package: grid checks, the (row, column) patch
  coordinates in merge-block order, per-frame attention segments, the 2-D rotary embedding and the
  attention itself. What differs lives here: the learned position table resampled to each grid,
  the MLP and merger names (`linear_fc1` / `linear_fc2`, `norm`), the patch embedding's bias, and
  DeepStack.
- The learned (side x side) position table is resampled bilinearly with align_corners=True to each
  image's (h, w) patch grid, as 4 taps and weights per patch, in HF's float32 arithmetic.
- DeepStack: the output of each block listed in `deepstack_visual_indexes` goes through its own
  merger (`deepstack_merger_list.j`, j = that block's place in the list; LayerNorm after the 2x2
  shuffle); the features come out in block order, as HF collects them.
- Parameter names equal the checkpoint's below `model.visual.`; the Conv3d patch embedding runs as
  a linear on the flattened patch (as in the qwen2_vl tower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from foveal.errors import ImageError
from foveal.models.families.qwen2_vl.config import QwenVisionConfig
from foveal.models.families.qwen2_vl.vision import (PatchEmbed, VisionAttention, VisionRotary, _activation,
                                                    check_grid, frame_lengths, vision_position_ids)


def position_taps(grids, merge: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners=True) taps into the flattened (side, side) table for every patch, in
    pixel_values' merge-block order: indices (N, 4) long, weights (N, 4) float32 (HF
    get_vision_interpolation_indices_and_weights, mode bilinear)."""
    coords = vision_position_ids(grids, merge)                                       # (N, 2) row, col
    sizes = torch.cat([torch.tensor([[h, w]]).expand(t * h * w, 2) for t, h, w in grids])   # (N, 2)
    src = coords.float() * (side - 1) / torch.clamp(sizes - 1, min=1)                # (N, 2)
    floor = torch.floor(src)
    offsets = torch.arange(0, 2)
    taps = (floor.long()[..., None] + offsets).clamp(0, side - 1)                    # (N, 2, 2)
    weights = (1 - (src[..., None] - floor[..., None] - offsets).abs()).clamp(min=0)  # (N, 2, 2)
    h_taps, w_taps = taps.unbind(1)
    h_weights, w_weights = weights.unbind(1)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    return indices, (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)


class VisionMLP(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.width, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.width)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """merge x merge neighbouring patches -> one LM token; the LayerNorm before the shuffle (main merger)
    or after it (DeepStack mergers, HF use_postshuffle_norm)."""

    def __init__(self, cfg: QwenVisionConfig, postshuffle_norm: bool = False):
        super().__init__()
        self.merged = cfg.width * cfg.merge_unit
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged if postshuffle_norm else cfg.width, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, cfg.out_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.merged)) if self.postshuffle_norm else self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))            # (N / merge^2, out_width)


class Qwen3VisionTower(nn.Module):
    """forward(pixel_values (N, C*Tp*P*P), grid_thw (n, 3)) -> (merged (N/merge^2, out),
    [deepstack feature (N/merge^2, out) per deepstack index, in block order])."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        if cfg.kind != "qwen3_vl":
            raise ImageError(f"Qwen3VisionTower builds qwen3_vl towers, not {cfg.kind!r}")
        self.cfg = cfg
        self.side = round(cfg.num_position_embeddings ** 0.5)
        self.patch_embed = PatchEmbed(cfg, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.width)
        self.rotary_pos_emb = VisionRotary(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(cfg, postshuffle_norm=True)
                                                   for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg = self.cfg
        if pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ImageError(f"pixel_values must be (patches, {cfg.patch_dim}) = (patches, C*Tp*P*P with "
                             f"C={cfg.in_channels}, Tp={cfg.temporal_patch_size}, P={cfg.patch_size}), "
                             f"got {tuple(pixel_values.shape)}")
        grids = check_grid(grid_thw, cfg.spatial_merge_size, pixel_values.shape[0])
        x = self.patch_embed(pixel_values)                                       # (N, D)
        indices, weights = position_taps(grids, cfg.spatial_merge_size, self.side)
        device = x.device
        pos = (self.pos_embed(indices.to(device)) * weights.to(device)[:, :, None]).sum(1)   # (N, D)
        x = x + pos.to(x.dtype)
        cos, sin = self.rotary_pos_emb(vision_position_ids(grids, cfg.spatial_merge_size).to(device))
        lengths = frame_lengths(grids)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, lengths)
            if i in cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack
