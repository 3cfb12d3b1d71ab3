"""Qwen2-VL and Qwen2.5-VL vision towers: pixel patches + grid_thw -> merged embeddings for the LM.

Mirrors transformers 5.25 `Qwen2VisionTransformerPretrainedModel` (models/qwen2_vl/modeling_qwen2_vl.py)
and `Qwen2_5_VisionTransformerPretrainedModel` (models/qwen2_5_vl/modeling_qwen2_5_vl.py), with the
grid helpers of transformers/vision_utils.py (`get_vision_position_ids`, `get_vision_cu_seqlens`,
`get_vision_window_index`).

Design decisions
- Parameter names equal the HF checkpoint's below the `visual.` (v4) / `model.visual.` (v5) prefix:
  `patch_embed.proj`, `blocks.N.{norm1,norm2,attn.qkv,attn.proj,mlp.*}`, `merger.{ln_q,mlp.0,mlp.2}`;
  loading is a strict `load_state_dict` after stripping the prefix.
- The Conv3d patch embedding keeps its (D, C, Tp, P, P) weight (the checkpoint's shape) but runs as
  a linear on the flattened patch: kernel = stride = the patch, so it is the same sum (1e-6 close,
  much cheaper on CPU than a 3-D convolution).
- Attention is one SDPA call per segment (HF's non-flash path does the same): a segment is one
  frame of one image / video for full attention, one window for Qwen2.5's window attention. Images
  never attend to each other, and neither do the frames of a video.
- Qwen2.5 window attention reorders tokens (in merge-unit groups of 4) so every window is
  contiguous, runs all blocks in that order, and undoes it after the merger, as HF does.
- Geometry is checked up front: a grid that does not divide by the merge size, or pixel_values
  whose row count or width disagree with grid_thw, is an ImageError saying what was expected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from foveal.errors import ImageError
from foveal.models.families.qwen2_vl.config import QwenVisionConfig
from foveal.models.text import RMSNorm, rotate_half


def _activation(name: str):
    if name == "quick_gelu":  # transformers.activations.QuickGELUActivation
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    return lambda x: F.gelu(x, approximate="tanh")  # gelu_pytorch_tanh


# ----------------------------------------------------------------------------- grid geometry


def check_grid(grid_thw: torch.Tensor, merge: int, n_rows: int | None = None) -> list[tuple[int, int, int]]:
    """grid_thw (n, 3) -> [(t, h, w), ...], checked; n_rows: pixel_values rows it must account for."""
    if not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        shape = tuple(grid_thw.shape) if isinstance(grid_thw, torch.Tensor) else type(grid_thw).__name__
        raise ImageError(f"grid_thw must be an (n, 3) tensor of [t, h, w] rows, got {shape}")
    if grid_thw.is_floating_point() or grid_thw.dtype == torch.bool:
        raise ImageError(f"grid_thw must hold integers, got {grid_thw.dtype}")
    grids = [tuple(int(x) for x in row) for row in grid_thw.tolist()]
    for i, (t, h, w) in enumerate(grids):
        if min(t, h, w) < 1:
            raise ImageError(f"grid_thw[{i}] = {[t, h, w]} has an empty side")
        if h % merge or w % merge:
            raise ImageError(f"grid_thw[{i}] = {[t, h, w]}: height and width (in patches) must be multiples "
                             f"of spatial_merge_size={merge}; resize the image with smart_resize")
    if n_rows is not None and n_rows != sum(t * h * w for t, h, w in grids):
        raise ImageError(f"pixel_values has {n_rows} patch rows but grid_thw {[list(g) for g in grids]} "
                         f"describes {sum(t * h * w for t, h, w in grids)} (sum of t*h*w)")
    return grids


def vision_position_ids(grids, merge: int) -> torch.Tensor:
    """(N, 2) (row, column) patch coordinates in the merge-block-major order pixel_values uses."""
    out = []
    for t, h, w in grids:
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(block).transpose(1, 2).flatten()
        wpos = wpos.reshape(block).transpose(1, 2).flatten()
        out.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    return torch.cat(out)


def frame_lengths(grids) -> list[int]:
    """Segment lengths for full attention: one per frame (h * w patches), images in order."""
    return [h * w for t, h, w in grids for _ in range(t)]


def window_index(grids, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL: the permutation of merge units that makes windows contiguous, and window lengths
    in patches (HF get_vision_window_index; windows cut at the bottom/right edge are smaller)."""
    index, lengths, offset = [], [], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = -gh % window, -gw % window  # HF pads a whole extra window when divisible: empty, dropped
        nh, nw = (gh + pad_h) // window, (gw + pad_w) // window
        padded = F.pad(ids, (0, pad_w, 0, pad_h), value=-1)
        padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
        counts = (padded >= 0).sum(-1).flatten()
        flat = padded.flatten()
        index.append(flat[flat >= 0] + offset)
        lengths += [int(c) * merge * merge for c in counts if c > 0]
        offset += t * gh * gw
    return torch.cat(index), lengths


class VisionRotary(nn.Module):
    """2-D axial RoPE: the first half of the head rotates with the row, the second with the column."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        half = self.head_dim // 2
        return 1.0 / (self.theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))  # (head_dim/4,)

    def init_rope(self, device=None) -> None:
        """Fill the (non-persistent) buffer; call after the module left the meta device."""
        self.inv_freq = self._inv_freq().to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # (N, 2, hd/4)
        freqs = freqs.flatten(1)                                                   # (N, hd/2): h then w
        freqs = torch.cat([freqs, freqs], dim=-1)                                  # (N, hd)
        return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF apply_rotary_pos_emb_vision: in float32, cast back
    xf = x.float()
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)


# ----------------------------------------------------------------------------- modules


class PatchEmbed(nn.Module):
    def __init__(self, cfg: QwenVisionConfig, bias: bool = False):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.width, kernel_size=kernel, stride=kernel, bias=bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.flatten(1), self.proj.bias)  # (N, D)


class VisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, cfg.width * 3, bias=True)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x, cos, sin, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)  # each (N, H, hd)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))                    # (H, N, hd)
        if len(lengths) == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs) for qs, ks, vs in
                             zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], dim=1)
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):  # Qwen2-VL / Qwen3-VL: fc1 -> act -> fc2
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.width)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):  # Qwen2.5-VL: SwiGLU with biases
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.width, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.width)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _norm(cfg: QwenVisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, eps=1e-6) if cfg.kind == "qwen2_5_vl" else nn.LayerNorm(dim, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.norm1 = _norm(cfg, cfg.width)
        self.norm2 = _norm(cfg, cfg.width)
        self.attn = VisionAttention(cfg)
        self.mlp = GatedMLP(cfg) if cfg.kind == "qwen2_5_vl" else VisionMLP(cfg)

    def forward(self, x, cos, sin, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """merge x merge neighbouring patches (adjacent rows of x) -> one LM token."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.merged = cfg.width * cfg.merge_unit
        self.ln_q = _norm(cfg, cfg.width)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(),
                                 nn.Linear(self.merged, cfg.out_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged))  # (N / merge^2, out_width)


class QwenVisionTower(nn.Module):
    """Qwen2-VL / Qwen2.5-VL ViT: forward(pixel_values (N, C*Tp*P*P), grid_thw (n, 3)) -> (N/merge^2, out)."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        if cfg.kind not in ("qwen2_vl", "qwen2_5_vl"):
            raise ImageError(f"QwenVisionTower builds qwen2_vl and qwen2_5_vl towers, not {cfg.kind!r}")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rotary_pos_emb = VisionRotary(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ImageError(f"pixel_values must be (patches, {cfg.patch_dim}) = (patches, C*Tp*P*P with "
                             f"C={cfg.in_channels}, Tp={cfg.temporal_patch_size}, P={cfg.patch_size}), "
                             f"got {tuple(pixel_values.shape)}")
        grids = check_grid(grid_thw, cfg.spatial_merge_size, pixel_values.shape[0])
        x = self.patch_embed(pixel_values)                                       # (N, D)
        cos, sin = self.rotary_pos_emb(vision_position_ids(grids, cfg.spatial_merge_size).to(x.device))
        full = frame_lengths(grids)
        if cfg.kind == "qwen2_5_vl":
            order, windows = window_index(grids, cfg.spatial_merge_size, cfg.window_merged)
            order = order.to(x.device)
            x, cos, sin = (self._by_unit(t, order) for t in (x, cos, sin))
            for i, block in enumerate(self.blocks):
                x = block(x, cos, sin, full if i in cfg.fullatt_block_indexes else windows)
            return self.merger(x)[torch.argsort(order)]
        for block in self.blocks:
            x = block(x, cos, sin, full)
        return self.merger(x)

    def _by_unit(self, t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        unit = self.cfg.merge_unit
        return t.reshape(-1, unit, t.shape[-1])[order].reshape(-1, t.shape[-1])
