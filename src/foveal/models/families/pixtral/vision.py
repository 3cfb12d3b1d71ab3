"""The Pixtral ViT and the two projectors (Pixtral-12B's, Mistral 3's).

Mirrors transformers 5.25 `PixtralVisionModel` (models/pixtral/modeling_pixtral.py), `LlavaMultiModalProjector`
(models/llava) and `Mistral3MultiModalProjector` / `Mistral3PatchMerger` (models/mistral3).

Design decisions
- Each image is convolved at its own size (cropped out of the padded batch by `image_sizes`), its patches
  flattened row-major and all images' patches concatenated into one sequence, then ln_pre (RMS norm).
- 2-D RoPE: head_dim/2 frequencies; the even ones turn with the patch's row, the odd ones with its column
  (HF's axial `inv_freq_2d` and `recomposition_frequencies`), rotate-half over the whole head.
- Attention is block-diagonal over the images: HF masks the other images out of one sequence; here SDPA runs
  on each image's rows (the same result, with no (N, N) mask). No causal mask, no biases.
- `forward` returns the hidden states the config asks for (index 0 is ln_pre's output, as HF's
  hidden_states), running the layers only as far as the deepest one needed.
- Module and parameter names equal the checkpoint's below `vision_tower.` / `multi_modal_projector.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...text import RMSNorm, rotate_half
from .config import PixtralConfig, PixtralVisionConfig

ACT = {
    "gelu": F.gelu,
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def axial_inv_freq(cfg: PixtralVisionConfig) -> torch.Tensor:
    """(head_dim/2,): the even frequencies (rows) then the odd ones (columns)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return torch.cat([inv_freq[0::2], inv_freq[1::2]])


def patch_positions(grids: list[tuple[int, int]]) -> torch.Tensor:
    """(N, 2) (row, column) of every patch of these (rows, columns) grids, row-major, image after image."""
    out = []
    for h, w in grids:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        out.append(torch.stack([rows.flatten(), cols.flatten()], dim=-1))
    return torch.cat(out)


class Attention(nn.Module):
    def __init__(self, cfg: PixtralVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, lengths: list[int]):
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.n_heads, self.head_dim).transpose(0, 1)   # (H, N, hd)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if len(lengths) == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs) for qs, ks, vs in
                             zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], dim=1)
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: PixtralVisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACT[cfg.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: PixtralVisionConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, 1e-5)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, 1e-5)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attention(self.attention_norm(x), cos, sin, lengths)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: PixtralVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class PixtralVisionTower(nn.Module):
    def __init__(self, cfg: PixtralVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_conv = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.ln_pre = RMSNorm(cfg.hidden_size, 1e-5)
        self.transformer = Transformer(cfg)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)

    def init_rope(self, device) -> None:
        self.inv_freq = axial_inv_freq(self.cfg).to(device)

    def rope(self, grids, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, head_dim) for the patches of these grids."""
        pos = patch_positions(grids).to(self.inv_freq.device)
        quarter = self.cfg.head_dim // 4
        freqs = pos[..., None].float() * self.inv_freq                      # (N, 2, hd/2)
        # rows turn the first quarter (the even frequencies), columns the second (the odd ones)
        freqs = torch.cat([freqs[:, 0, :quarter], freqs[:, 1, quarter:]], dim=-1)   # (N, hd/2)
        freqs = torch.cat([freqs, freqs], dim=-1)                            # (N, hd)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def forward(self, pixel_values: torch.Tensor, image_sizes: list[tuple[int, int]],
                layers: tuple[int, ...]) -> list[torch.Tensor]:
        """pixel_values (B, C, H, W), padded; image_sizes [(h, w)] px -> the hidden states at `layers`
        (indices into HF's hidden_states, negative from the end), each (patches of all images, D)."""
        p = self.cfg.patch_size
        embeds = self.patch_conv(pixel_values.to(self.patch_conv.weight.dtype))      # (B, D, H/p, W/p)
        grids = [(h // p, w // p) for h, w in image_sizes]
        x = torch.cat([e[:, :gh, :gw].flatten(1).T for e, (gh, gw) in zip(embeds, grids)])   # (N, D)
        x = self.ln_pre(x)
        cos, sin = self.rope(grids, x.dtype)
        lengths = [gh * gw for gh, gw in grids]
        n_states = len(self.transformer.layers) + 1
        wanted = [i % n_states for i in layers]
        states = {0: x}
        for i, layer in enumerate(self.transformer.layers[:max(wanted)], start=1):
            x = layer(x, cos, sin, lengths)
            states[i] = x
        return [states[i] for i in wanted]


class LlavaProjector(nn.Module):
    """Pixtral-12B: Linear -> activation -> Linear (LlavaMultiModalProjector)."""

    def __init__(self, cfg: PixtralConfig):
        super().__init__()
        d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
        self.linear_1 = nn.Linear(d_in, cfg.text.hidden_size, bias=cfg.projector_bias)
        self.act = ACT[cfg.projector_act]
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)

    def forward(self, x, grids):
        return self.linear_2(self.act(self.linear_1(x)))


class PatchMerger(nn.Module):
    """merge x merge neighbouring patches -> one row (Mistral3PatchMerger: F.unfold's channel-major order)."""

    def __init__(self, cfg: PixtralConfig):
        super().__init__()
        self.merge = cfg.spatial_merge_size
        d = cfg.vision.hidden_size
        self.merging_layer = nn.Linear(d * self.merge ** 2, d, bias=False)

    def forward(self, x, grids):
        d, m = x.shape[-1], self.merge
        out = []
        for rows, (h, w) in zip(x.split([h * w for h, w in grids]), grids):
            grid = rows.view(h, w, d).permute(2, 0, 1).unsqueeze(0)                  # (1, D, h, w)
            out.append(F.unfold(grid, kernel_size=m, stride=m).view(d * m * m, -1).t())   # (h*w/m^2, D*m^2)
        return self.merging_layer(torch.cat(out))


class Mistral3Projector(nn.Module):
    """Mistral 3: RMS norm -> patch merger -> Linear -> activation -> Linear (Mistral3MultiModalProjector)."""

    def __init__(self, cfg: PixtralConfig):
        super().__init__()
        d = cfg.vision.hidden_size
        self.norm = RMSNorm(d, cfg.projector_norm_eps)
        self.patch_merger = PatchMerger(cfg)
        self.linear_1 = nn.Linear(d * len(cfg.feature_layers), cfg.text.hidden_size, bias=cfg.projector_bias)
        self.act = ACT[cfg.projector_act]
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)

    def forward(self, x, grids):
        x = self.patch_merger(self.norm(x), grids)
        return self.linear_2(self.act(self.linear_1(x)))
