"""Decoder-only language model (Llama / Mistral / Qwen2) with a static KV cache.

Mirrors transformers' models/llama/modeling_llama.py and models/qwen2/modeling_qwen2.py:
the same operations in the same dtypes, so float32 logits agree to ~1e-6.

Design decisions (after gpt-fast):
- The KV cache is a preallocated buffer per layer, written at the new tokens' slots; every decode step
  has the same shapes, no `torch.cat`, no per-token allocation growing with length.
- `forward(embeds, positions, kv_len, start)` is pure given the cache. Positions are an input,
  apart from cache slots: (T,) absolute positions, or (3, T) temporal/height/width positions for
  multimodal RoPE (Qwen2-VL's M-RoPE, `cfg.mrope_section`), which a family computes; the new
  tokens go into cache slots [start, start + T) (by default start = positions[0], the 1-D case).
  Training (no cache) may give every row of a padded batch its own positions, (B, T) or (3, B, T).
  Attention reads only the cache slots written so far (a view, no copy): a decode step needs no
  mask, a fresh prefill uses SDPA's causal path, and only a prefill after a reused prefix builds a
  (T, kv_len) mask. This trades shape stability
  (torch.compile / CUDA graphs would want the full cache and a mask) for work proportional to
  the real length, which is what eager CPU decode needs.
- Per-layer additions for prefill (`layer_additions`): rows added to the hidden states at masked
  positions after the first len(additions) layers (Qwen3-VL's DeepStack visual features). Only a
  prefill passes them; the decode step's inputs and work are unchanged.
- Optional per-head q/k RMSNorm before RoPE (`cfg.qk_norm`, Qwen3), and M-RoPE rows either in
  sections (Qwen2-VL) or interleaved over the frequencies (`cfg.mrope_interleaved`, Qwen3-VL).
- RoPE inverse frequencies are computed once (default / linear / llama3) or per call from the
  largest position (dynamic NTK, as transformers' `dynamic_rope_update` does).
- GQA through SDPA's `enable_gqa`, so K/V are never repeated in memory.
- Module names equal the HF checkpoint's (`embed_tokens`, `layers.N.self_attn.q_proj`, ...).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import RopeConfig, TextConfig
from ..errors import PromptError


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_position: int, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), as transformers' ROPE_INIT_FUNCTIONS compute them."""
    base = rope.theta
    if rope.kind == "dynamic":
        # transformers: seq_len = max(seq_len, max_position_embeddings)
        seq_len = max(seq_len or max_position, max_position)
        base = base * ((rope.factor * seq_len / max_position) - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class AttnSpec(NamedTuple):
    """How one forward attends: over cache slots [0, kv_len) (None: no cache, just the new tokens),
    the new tokens written at the last T of them, with a boolean mask (T, kv_len), or causally
    (is_causal), or to everything (neither)."""
    mask: torch.Tensor | None
    is_causal: bool
    kv_len: int | None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32 as transformers computes it (one fused op, bitwise
        # the same result here), cast back, then scaled in the input dtype
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], None, self.eps).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        # k, v: (B, n_kv, T, hd) written at slots [start, start + T)
        T = k.shape[2]
        self.k[:, :, start:start + T] = k.to(self.k.dtype)
        self.v[:, :, start:start + T] = v.to(self.v.dtype)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:     # Qwen3: over each head's head_dim, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, attn: AttnSpec):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(attn.kv_len - T, k, v)                         # (B, KV, S, hd)
            k, v = k[:, :, :attn.kv_len], v[:, :, :attn.kv_len]   # only the slots written so far
        if T == 1 and attn.mask is None and not attn.is_causal:
            y = self._decode_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, is_causal=attn.is_causal,
                                               enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


    def _decode_attention(self, q, k, v):
        """One query per head against the cache: two small matmuls, several times faster on CPU than
        SDPA's kernels for this shape. Query heads of one KV group are stacked as rows (GQA, no copy)."""
        B, H, _, hd = q.shape
        # float32: bf16 matmuls whose length changes every step leave a new oneDNN primitive behind
        # each time (memory grew ~1.3 MiB per token); the fp32 copies of one layer's K/V are small.
        qg = q.float().view(B, self.n_kv, H // self.n_kv, hd)                # (B, KV, rep, hd)
        scores = (qg @ k.float().transpose(-1, -2)) * (hd ** -0.5)           # (B, KV, rep, S)
        return (scores.softmax(-1) @ v.float()).to(q.dtype).view(B, H, 1, hd)   # (B, H, 1, hd)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn: AttnSpec):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.max_cache_len = 0
        self.gradient_checkpointing = False

    def init_rope(self, device=None) -> None:
        """Fill the (non-persistent) RoPE buffer; call after the module left the meta device."""
        self.inv_freq = rope_inv_freq(self.cfg.rope, self.cfg.head_dim, self.cfg.max_position_embeddings).to(device)

    def setup_cache(self, batch: int, max_len: int, dtype) -> None:
        """Allocate the static KV cache once, each layer's on that layer's device (a model split by
        --gpu-layers has two); later calls with the same size reuse it."""
        if self.max_cache_len == max_len and self.layers and self.layers[0].self_attn.kv_cache is not None:
            cache = self.layers[0].self_attn.kv_cache
            if cache.k.shape[0] == batch and cache.k.dtype == dtype:
                return
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch, self.cfg.num_key_value_heads, max_len, self.cfg.head_dim,
                                               dtype, layer.input_layernorm.weight.device)
        self.max_cache_len = max_len

    def drop_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.max_cache_len = 0

    @property
    def cache_len(self) -> int:
        """Slots of the allocated KV cache (0: none)."""
        return self.max_cache_len if self.layers and self.layers[0].self_attn.kv_cache is not None else 0

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, hd) for positions (T,), or (3, T) under M-RoPE; (B, T, hd) for a batch whose rows
        have positions of their own, (B, T), or (3, B, T) under M-RoPE (training on padded batches)."""
        inv_freq = self.inv_freq
        if self.cfg.rope.kind == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.cfg.max_position_embeddings:
                inv_freq = rope_inv_freq(self.cfg.rope, self.cfg.head_dim, self.cfg.max_position_embeddings,
                                         seq_len).to(inv_freq.device)
        if positions.dim() == 1:
            freqs = positions.float()[:, None] * inv_freq.float()[None, :]    # (T, hd/2)
        elif self.cfg.mrope_section is None:                               # a batch: (B, T)
            freqs = positions.float()[..., None] * inv_freq.float()           # (B, T, hd/2)
        else:
            # Qwen2-VL's apply_multimodal_rotary_pos_emb: frequency section i rotates by position row i % 3
            # (temporal, height, width); taken on the half before doubling, which is the same selection
            rows = positions.float()[..., None] * inv_freq.float()           # (3, [B,] T, hd/2)
            if self.cfg.mrope_interleaved:
                # Qwen3-VL's recomposition_frequencies: frequency j takes row 1 (height) if j % 3 == 1 and
                # j < 3 * section[1], row 2 (width) if j % 3 == 2 and j < 3 * section[2], else row 0
                freqs = rows[0].clone()
                for row in (1, 2):
                    idx = slice(row, self.cfg.mrope_section[row] * 3, 3)
                    freqs[..., idx] = rows[row][..., idx]
            else:
                sections = rows.split(list(self.cfg.mrope_section), dim=-1)
                freqs = torch.cat([s[i % 3] for i, s in enumerate(sections)], dim=-1)   # ([B,] T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                            # ([B,] T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None,
                start: int | None = None, layer_additions=None) -> torch.Tensor:
        """embeds (B, T, D) at RoPE positions (T,) or (3, T) -> hidden states (B, T, D). Without a cache, a
        batch may give each row its own positions: (B, T), or (3, B, T) under M-RoPE.

        With a cache, the new tokens go into slots [start, start + T); by default start = positions[0]
        (1-D positions are their own slots). Without a cache, every row is causal over its own T
        tokens: right-padded batches need no extra mask, since real tokens never attend to the padding
        after them. kv_len: a decode step (T == 1) may say how many cache slots it attends to (its slot
        + 1), so that nothing reads a position back (no device sync; a Python int that torch.compile
        keeps symbolic).
        layer_additions: for a prefill, a list of (mask (B, T) bool, rows (mask.sum(), D)); entry i is
        added to the hidden states at the masked positions after layer i (HF Qwen3-VL's
        `_deepstack_process`)."""
        cos, sin = self.rope(positions, embeds.dtype)
        if cos.dim() == 3:                          # per-row positions: (B, 1, T, hd) against (B, H, T, hd)
            cos, sin = cos[:, None], sin[:, None]
        T = embeds.shape[1]
        if kv_len is not None and T == 1:
            attn = AttnSpec(None, False, kv_len)
        elif self.layers[0].self_attn.kv_cache is None:
            attn = AttnSpec(None, T > 1, None)      # training: causal, SDPA's fused path
        else:
            if start is None:
                start = int(positions[0])
            kv_len = start + T                      # the new tokens end at kv_len, attend to slots before
            if T == 1:
                attn = AttnSpec(None, False, kv_len)                # decode: every written slot
            elif start == 0:
                attn = AttnSpec(None, True, kv_len)                 # fresh prefill: plain causal
            else:                                                    # prefill after a reused prefix
                slots = torch.arange(kv_len, device=embeds.device)
                new = torch.arange(start, kv_len, device=embeds.device)
                attn = AttnSpec(slots[None, :] <= new[:, None], False, kv_len)   # (T, kv_len)
        x = embeds
        n_added = 0 if layer_additions is None else len(layer_additions)
        for i, layer in enumerate(self.layers):
            if layer.input_layernorm.weight.device != x.device:   # split by --gpu-layers: cross once
                x, cos, sin, attn = _to_device(layer.input_layernorm.weight.device, x, cos, sin, attn)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn)
            if i < n_added:
                x = _add_rows(x, *layer_additions[i])
        return self.norm(x.to(self.norm.weight.device))


def _add_rows(x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) with rows (n, D) added at the n True positions of mask (B, T), out of place."""
    mask = mask.to(x.device)
    if rows.shape[0] != int(mask.sum()):
        raise PromptError(f"{rows.shape[0]} feature rows to add at {int(mask.sum())} masked positions")
    return x.masked_scatter(mask[..., None], x[mask] + rows.to(x.device, x.dtype))


def _to_device(device, x, cos, sin, attn: AttnSpec):
    mask = None if attn.mask is None else attn.mask.to(device)
    return x.to(device), cos.to(device), sin.to(device), attn._replace(mask=mask)
