"""InternViT, the pixel shuffle and the projector, as transformers 5.25's modeling_internvl.py runs them.

Module names equal the checkpoint's (`vision_tower.embeddings.patch_embeddings.projection`,
`vision_tower.encoder.layer.N.attention.q_proj`, `multi_modal_projector.linear_1`, ...), so no name
rule is needed past the shared `model.` prefixes.

Design decisions:
- A layer is pre-norm with learnt per-channel layer scales on both branches (`lambda_1`,
  `lambda_2`: InternVLVisionLayer); its two norms are LayerNorm or RMSNorm by `norm_type`.
- The optional QK norm is an RMSNorm over the whole q / k width (eps 1e-6, not layer_norm_eps)
  before the heads split, as InternVLVisionAttention applies it; the RMSNorm is HF's own
  arithmetic (float32 variance, rsqrt), not text.py's fused one.
- Only the layers the selected features need are run: `vision_feature_layer` k < 0 or k < depth
  reads hidden_states[k] (the embeddings are hidden_states[0]); -1 is the tower's output, after its
  final LayerNorm when `use_mean_pooling` is off.
- Tiles are always the tower's own size, so the position table is added as is (HF interpolates it
  only for another size).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...vision import ACTIVATIONS
from .config import InternViTConfig, InternVLConfig


class VisionRMSNorm(nn.Module):
    """InternVLVisionRMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _norm(cfg: InternViTConfig) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return VisionRMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.projection(pixels.to(self.projection.weight.dtype))     # (N, D, g, g)
        return x.flatten(2).transpose(1, 2)                               # (N, g*g, D)


class Embeddings(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        if cfg.use_mask_token:       # masked image modelling only: loaded, never used here
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.position_embeddings = (nn.Parameter(torch.zeros(1, cfg.grid ** 2 + 1, cfg.hidden_size))
                                    if cfg.use_absolute_position_embeddings else None)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(pixels)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)   # (N, 1 + g*g, D)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings
        return x


class Attention(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.n_heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.projection_layer = nn.Linear(d, d)
        self.qk_norm = cfg.use_qk_norm
        if cfg.use_qk_norm:
            self.q_norm = VisionRMSNorm(d)
            self.k_norm = VisionRMSNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(N, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (N, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.projection_layer(y.transpose(1, 2).reshape(N, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)
        self.layernorm_before = _norm(cfg)
        self.layernorm_after = _norm(cfg)
        self.lambda_1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lambda_2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lambda_1 * self.attention(self.layernorm_before(x)) + x
        return self.lambda_2 * self.mlp(self.layernorm_after(x)) + x


class Encoder(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class InternViT(nn.Module):
    """InternVLVisionModel: tiles (N, 3, S, S) -> the selected hidden states (N, 1 + g*g, D), CLS first."""

    def __init__(self, cfg: InternViTConfig, feature_layer: int = -1):
        super().__init__()
        self.cfg, self.feature_layer = cfg, feature_layer
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        if not cfg.use_mean_pooling:
            self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        last = self.feature_layer == -1
        n_run = self.cfg.num_hidden_layers if last else self.feature_layer % (self.cfg.num_hidden_layers + 1)
        x = self.embeddings(pixels)
        for layer in self.encoder.layer[:n_run]:
            x = layer(x)
        if last and not self.cfg.use_mean_pooling:
            x = self.layernorm(x)
        return x


def pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """InternVLModel.pixel_shuffle, step for step: (N, w, h, C) -> (N, w*s, h*s, C / s^2)."""
    N, w, h, c = x.shape
    x = x.view(N, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(N, int(h * scale), int(w * scale), int(c / (scale ** 2)))
    return x.permute(0, 2, 1, 3).contiguous()


class MultiModalProjector(nn.Module):
    """InternVLMultiModalProjector: LayerNorm -> Linear -> act -> Linear over s^2 merged patches."""

    def __init__(self, cfg: InternVLConfig):
        super().__init__()
        width = cfg.vision.hidden_size * cfg.shuffle ** 2
        self.layer_norm = nn.LayerNorm(width)
        self.linear_1 = nn.Linear(width, cfg.text.hidden_size)
        self.act = ACTIVATIONS[cfg.projector_hidden_act]
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))
