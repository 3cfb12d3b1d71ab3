"""Mllama's language model: a Llama decoder with gated cross-attention layers over the image states.

Mirrors transformers 5.25's MllamaTextModel / MllamaCrossAttentionDecoderLayer / MllamaTextCrossAttention.
The self-attention layers are models/text.py's `DecoderLayer` (the same math as MllamaSelfAttentionDecoderLayer);
the layers at `cross_attention_layers` are `CrossAttentionDecoderLayer`, indexed in `layers` as in the
checkpoint (`language_model.layers.N.cross_attn.*`), so GPU-layer placement and the planner count them.

Design decisions:
- A cross-attention layer holds the keys and values of the current image set (`set_images`): computed
  once from the projected vision states (k_proj / v_proj, k_norm), kept across the prefill, every decode
  step and the next request with the same images (the family model decides when to recompute).
- Its additive mask (T, images * tiles * patches) is set per forward (`set_mask`): the prefill's rows, then
  the last prompt row for every decode step (HF's generate repeats that row). A row that attends to no
  image tile is all zeros, as HF makes it (uniform attention), and its MLP output is dropped
  (`full_text_row_masked_out_mask`).
- Without images the cross-attention layers are skipped, as in HF.
- The decode step's inputs and signature are TextModel's: the images live in the layers' own state.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ....config import TextConfig
from ...text import MLP, KVCache, RMSNorm, TextModel


class CrossAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected vision states (S, D) -> K, V (1, KV, S, hd), k normed (HF's order: project, view, norm)."""
        S = states.shape[0]
        k = self.k_proj(states).view(1, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(1, S, self.n_kv, self.head_dim).transpose(1, 2)
        return self.k_norm(k), v

    def forward(self, x, k, v, mask):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2))   # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class CrossAttentionDecoderLayer(nn.Module):
    """MllamaCrossAttentionDecoderLayer: tanh-gated cross-attention and MLP. Called as a DecoderLayer is
    (x, cos, sin, attn); RoPE and the self-attention cache do not concern it."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cross_attn = CrossAttention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = MLP(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None   # the image set's K, V (1, KV, S, hd)
        self.mask: torch.Tensor | None = None          # additive (1, 1, T, S) for the rows of the next forward
        self.row_kept: torch.Tensor | None = None      # (1, T, 1): 0 where a row attends to no image

    def set_images(self, states: torch.Tensor | None) -> None:
        """Compute (states (S, D)) or drop (None) this layer's image keys and values."""
        if states is None:
            self.kv = None
            return
        w = self.cross_attn.k_proj.weight
        self.kv = self.cross_attn.keys_values(states.to(w.device, self.input_layernorm.weight.dtype))

    def set_mask(self, mask: torch.Tensor, row_kept: torch.Tensor) -> None:
        device = self.input_layernorm.weight.device
        self.mask, self.row_kept = mask.to(device), row_kept.to(device)

    def forward(self, x, cos, sin, attn):
        if self.kv is None:         # no images: HF skips the layer
            return x
        h = self.cross_attn(self.input_layernorm(x), *self.kv, self.mask.to(x.dtype))
        x = x + self.cross_attn_attn_gate.tanh() * h
        h = self.mlp(self.post_attention_layernorm(x)) * self.row_kept.to(x.dtype)
        return x + self.cross_attn_mlp_gate.tanh() * h


class MllamaTextModel(TextModel):
    """TextModel with CrossAttentionDecoderLayer at `cross_layers` and HF's 8 extra embedding rows (the
    `<|image|>` token and its reserved neighbours sit past the head's vocabulary)."""

    def __init__(self, cfg: TextConfig, cross_layers: list[int]):
        super().__init__(cfg)
        self.cross_layers = list(cross_layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size + 8, cfg.hidden_size)
        for i in self.cross_layers:
            self.layers[i] = CrossAttentionDecoderLayer(cfg)

    def cross(self) -> list[CrossAttentionDecoderLayer]:
        return [self.layers[i] for i in self.cross_layers]

    def _self_layers(self):
        return [layer for i, layer in enumerate(self.layers) if i not in self.cross_layers]

    def setup_cache(self, batch: int, max_len: int, dtype) -> None:
        first = self._self_layers()[0].self_attn.kv_cache
        if self.max_cache_len == max_len and first is not None and first.k.shape[0] == batch and first.k.dtype == dtype:
            return
        for layer in self._self_layers():
            layer.self_attn.kv_cache = KVCache(batch, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim,
                                               dtype, layer.input_layernorm.weight.device)
        self.max_cache_len = max_len

    def drop_cache(self) -> None:
        for layer in self._self_layers():
            layer.self_attn.kv_cache = None
        self.max_cache_len = 0

    @property
    def cache_len(self) -> int:
        return self.max_cache_len if self._self_layers()[0].self_attn.kv_cache is not None else 0
