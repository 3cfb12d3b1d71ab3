"""Idefics3 / SmolVLM vision side: a SigLIP ViT with NaViT-style position buckets, and the connector.

Mirrors transformers 5.25's `Idefics3VisionTransformer` (`SmolVLMVisionTransformer` is the same) and
`Idefics3Connector` (models/idefics3/modeling_idefics3.py); module names are the checkpoint's
(`vision_model.embeddings.patch_embedding`, `vision_model.encoder.layers.N.*`, `vision_model.post_layernorm`,
`connector.modality_projection.proj`).

Design decisions:
- The encoder layers are models.vision's SigLIP layers; what differs from LLaVA's SigLIP tower is here:
  position ids bucketed from each frame's valid patch grid (`patch_attention_mask`), so a frame of another
  size than `image_size` reads a resampled grid of the learned table, a key mask over padded patches, and
  the `post_layernorm` Idefics3 applies (LLaVA's towers never build it).
- A frame whose patches are all valid attends without a mask (SDPA's unmasked path, as HF's
  create_bidirectional_mask returns no mask then).
- The connector's pixel shuffle folds each scale x scale block of patches into one row, in HF's order
  (two view / permute steps), then one bias-free linear layer to the LM width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ....config import VisionConfig
from ...vision import VisionEncoder


class Idefics3VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.per_side = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(self.per_side ** 2, cfg.hidden_size)

    def position_ids(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """patch_mask (B, h, w) bool -> (B, h*w) ids into the learned table (HF's bucketize of fractional
        coordinates over each frame's valid patches; padded patches read id 0)."""
        B, h, w = patch_mask.shape
        device = patch_mask.device
        boundaries = torch.arange(1 / self.per_side, 1.0, 1 / self.per_side, device=device)
        step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1)                           # (B,)
        step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1)
        frac_h = torch.arange(h, device=device, dtype=torch.float32)[None, :] * step_h[:, None]
        frac_w = torch.arange(w, device=device, dtype=torch.float32)[None, :] * step_w[:, None]
        bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)   # (B, h)
        bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)   # (B, w)
        ids = (bucket_h[:, :, None] * self.per_side + bucket_w[:, None, :]).reshape(B, -1)
        return torch.where(patch_mask.view(B, -1), ids, torch.zeros_like(ids))

    def forward(self, pixels: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))   # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)                                          # (B, h*w, D)
        return x + self.position_embedding(self.position_ids(patch_mask))


class Idefics3VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Idefics3VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg, cfg.num_hidden_layers)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (B, 3, H, W), pixel_mask (B, H, W) (1: a real pixel; None: all real) -> (B, h*w, D)."""
        B, _, H, W = pixels.shape
        p = self.cfg.patch_size
        if pixel_mask is None:
            patch_mask = torch.ones(B, H // p, W // p, dtype=torch.bool, device=pixels.device)
        else:   # a patch counts when any of its pixels is real (HF's unfold + sum > 0)
            m = pixel_mask.to(pixels.device)[:, :H // p * p, :W // p * p]
            patch_mask = m.reshape(B, H // p, p, W // p, p).sum(dim=(2, 4)) > 0
        x = self.embeddings(pixels, patch_mask)
        mask = None
        if not bool(patch_mask.all()):
            mask = patch_mask.view(B, 1, 1, -1)                                  # keys: padded patches masked
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)


class Idefics3Projection(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Idefics3Connector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, scale_factor: int):
        super().__init__()
        self.scale_factor = scale_factor
        self.modality_projection = Idefics3Projection(vision_hidden * scale_factor ** 2, text_hidden)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """(B, seq, D) over a square patch grid -> (B, seq / s^2, D * s^2), HF's order."""
        s = self.scale_factor
        B, seq, D = x.shape
        side = int(seq ** 0.5)
        x = x.view(B, side, side // s, D * s)
        x = x.permute(0, 2, 1, 3)
        x = x.reshape(B, side // s, side // s, D * s * s)
        x = x.permute(0, 2, 1, 3)
        return x.reshape(B, seq // (s * s), D * s * s)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.modality_projection(self.pixel_shuffle(features))
