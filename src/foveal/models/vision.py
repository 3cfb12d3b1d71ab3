"""Vision towers: CLIP and SigLIP ViTs, as LLaVA uses them.

Mirrors transformers' `CLIPVisionTransformer` / `SiglipVisionTransformer`
(models/clip/modeling_clip.py, models/siglip/modeling_siglip.py); module names equal the
checkpoint's (after `vision_model.` is stripped) so weights load by name.

Design decisions:
- `forward(pixels, layers)` returns only the hidden states that are asked for, and runs only
  as many encoder layers as the deepest one needs: with feature layer -2 on a 24-layer tower,
  23 layers run. Hidden state 0 is the embedding output after CLIP's `pre_layrnorm`.
- `post_layernorm` and SigLIP's pooling head are never part of LLaVA's features; they are not
  built, and their weights are reported as unused by the loader.
- Attention goes through `scaled_dot_product_attention` (no mask: every patch sees every patch).
- On CPU in bf16/fp16 the token rows are padded to a multiple of 8 (577 -> 584 for CLIP-L/336) and
  the padding keys masked out: oneDNN's bf16 GEMM ran 14-16 % slower on 577 rows than on 584 here
  (whole CLIP-L/336 encode: 1.49 -> 1.28 s). The GEMM rows come out bitwise the same; the masked
  attention rounds differently, with the same error against float32 (1.42 % vs 1.41 % relative on
  the benchmark's random tower). float32 GEMMs gain nothing, so they are not padded.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig


ROW_MULTIPLE = 8     # CPU low-precision GEMMs: token rows padded to a multiple of this


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.has_cls = not cfg.is_siglip
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, bias=cfg.is_siglip)
        n_positions = cfg.num_patches + (1 if self.has_cls else 0)
        if self.has_cls:
            self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.position_embedding = nn.Embedding(n_positions, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)                                        # (B, h*w, D)
        if self.has_cls:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)                                      # (B, 1+h*w, D)
        return x + self.position_embedding.weight.to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision activation {cfg.hidden_act!r}")
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(n_layers))


class VisionTower(nn.Module):
    """CLIP / SigLIP ViT returning the selected hidden states (before any post-layernorm)."""

    def __init__(self, cfg: VisionConfig, feature_layers: list[int]):
        super().__init__()
        self.cfg = cfg
        total = cfg.num_hidden_layers
        # hidden_states index i (0..total); negative indices count from total + 1.
        self.feature_indices = [i if i >= 0 else total + 1 + i for i in feature_layers]
        n_run = max(self.feature_indices)
        self.embeddings = VisionEmbeddings(cfg)
        if not cfg.is_siglip:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, HF's name
        self.encoder = VisionEncoder(cfg, n_run)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels (B, 3, H, W) -> [hidden state (B, T, D) for each feature layer, in order]."""
        x = self.embeddings(pixels)
        if not self.cfg.is_siglip:
            x = self.pre_layrnorm(x)
        T = x.shape[1]
        pad = (-T) % ROW_MULTIPLE if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) else 0
        mask = None
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            mask = torch.zeros(1, 1, 1, T + pad, dtype=x.dtype, device=x.device)
            mask[..., T:] = float("-inf")
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x, mask)
            states[i] = x
        return [states[i][:, :T] for i in self.feature_indices]
