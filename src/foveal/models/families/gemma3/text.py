"""Gemma 3's decoder: the shared decoder's KV cache, cache sizing and RoPE maths, with Gemma's layers.

Mirrors transformers 5.25's models/gemma3/modeling_gemma3.py (Gemma3TextModel): embeddings scaled by
sqrt(hidden) in the embedding's dtype, (1 + w) RMSNorms computed in float32, a norm after attention and
after the MLP besides the two before them, GeGLU (gelu_pytorch_tanh), per-head q/k norms, scores scaled by
query_pre_attn_scalar ** -0.5, and two kinds of layer: sliding-window ones with the local RoPE base and
global ones with the (scaled) global RoPE.

Design decisions:
- `Gemma3TextModel` is a `models.text.TextModel` (the cache, its sizing on each layer's device, `cache_len`)
  with Gemma's layers; module names equal the checkpoint's (`layers.N.pre_feedforward_layernorm`, ...).
- A sliding layer sees the last `sliding_window` positions, itself included (HF: kv > q - window), in a
  prefill through its mask and in a decode step by slicing the cache to those slots: no mask, the decode
  step's inputs unchanged. The cache keeps every slot (no ring buffer): a prefix reused after the window
  has moved on still has its keys.
- The tokens of one image attend to each other both ways during a prefill (HF's token_type_ids mask:
  OR(causal, same image) on global layers, AND(window, OR(causal, same image)) on sliding ones). `forward`
  takes the image spans as block ids over the whole prompt (-1 outside images); a decode step never has any.
- No mask at all where plain causal attention is the same thing (no image, a fresh prefill no longer than
  the window): SDPA's causal path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...text import AttnSpec, KVCache, TextModel, rope_inv_freq, rotate_half   # noqa: F401 - KVCache via setup_cache
from .config import Gemma3TextConfig


class GemmaRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), all in float32, then cast (Gemma3RMSNorm; its weight is
    centred on zero)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), x.shape[-1:], None, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times sqrt(hidden_size) rounded to the embedding's dtype (Gemma3TextScaledWordEmbedding:
    55.43 becomes 55.5 in bfloat16, as in HF)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__(vocab, dim)
        self.scale = dim ** 0.5
        self.register_buffer("embed_scale", torch.empty(()), persistent=False)

    def init_scale(self, device=None) -> None:
        self.embed_scale = torch.tensor(self.scale, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig, sliding: bool):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.window = cfg.sliding_window if sliding else None
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, attn: AttnSpec):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(attn.kv_len - T, k, v)                         # (B, KV, S, hd)
            first = 0
            if T == 1 and attn.mask is None and self.window is not None and attn.kv_len > self.window:
                first = attn.kv_len - self.window   # a decode step: the last `window` slots, itself included
            k, v = k[:, :, first:attn.kv_len], v[:, :, first:attn.kv_len]
        if T == 1 and attn.mask is None and not attn.is_causal:
            y = self._decode_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, is_causal=attn.is_causal,
                                               scale=self.scale, enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _decode_attention(self, q, k, v):
        """models.text.Attention._decode_attention with Gemma's score scale."""
        B, H, _, hd = q.shape
        qg = q.float().view(B, self.n_kv, H // self.n_kv, hd)                 # (B, KV, rep, hd)
        scores = (qg @ k.float().transpose(-1, -2)) * self.scale              # (B, KV, rep, S)
        return (scores.softmax(-1) @ v.float()).to(q.dtype).view(B, H, 1, hd)


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig, sliding: bool):
        super().__init__()
        self.sliding = sliding
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.self_attn = Gemma3Attention(cfg, sliding)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.mlp = Gemma3MLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x, cos, sin, attn: AttnSpec):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attn))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def attention_specs(T: int, start: int, kv_len: int | None, window: int, blocks: torch.Tensor | None,
                    device) -> dict[bool, AttnSpec]:
    """{sliding: AttnSpec} for T new tokens at positions [start, start + T) against kv_len slots (None: no
    cache, the T tokens alone). blocks: (B, kv_len) image block ids (-1: text), or None."""
    n_kv = T if kv_len is None else kv_len
    if T == 1 and blocks is None:
        return {s: AttnSpec(None, False, kv_len) for s in (False, True)}
    if blocks is None and start == 0:
        causal = AttnSpec(None, True, kv_len)
        if T <= window:
            return {False: causal, True: causal}
    q = torch.arange(start, start + T, device=device)[:, None]
    kv = torch.arange(n_kv, device=device)[None, :]
    allowed = kv <= q                                                   # (T, kv)
    if blocks is not None:
        bq, bk = blocks[:, start:start + T, None].to(device), blocks[:, None, :n_kv].to(device)
        allowed = (allowed | ((bq == bk) & (bq >= 0)))[:, None]         # (B, 1, T, kv)
    full = AttnSpec(None, True, kv_len) if blocks is None and start == 0 else AttnSpec(allowed, False, kv_len)
    return {False: full, True: AttnSpec(allowed & (kv > q - window), False, kv_len)}


def image_blocks(image_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, T) ids of the contiguous image runs, -1 outside them (HF's
    get_block_sequence_ids_for_mask)."""
    previous = F.pad(image_mask, (1, 0), value=False)[:, :-1]
    ids = torch.cumsum((image_mask & ~previous).int(), dim=1) - 1
    return torch.where(image_mask, ids, -1)


class Gemma3TextModel(TextModel):
    def __init__(self, cfg: Gemma3TextConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, cfg.is_sliding(i)) for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)         # global layers
        self.register_buffer("local_inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)   # sliding ones
        self.max_cache_len = 0
        self.gradient_checkpointing = False

    def init_rope(self, device=None) -> None:
        c = self.cfg
        self.inv_freq = rope_inv_freq(c.rope, c.head_dim, c.max_position_embeddings).to(device)
        self.local_inv_freq = rope_inv_freq(c.local_rope, c.head_dim, c.max_position_embeddings).to(device)
        self.embed_tokens.init_scale(device)

    @staticmethod
    def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype):
        freqs = positions.float()[..., None] * inv_freq.float()                  # ([B,] T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None,
                start: int | None = None, layer_additions=None, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """As TextModel.forward (1-D positions, or (B, T) without a cache); blocks: the prompt's image block ids
        (B, T_prompt), for a prefill (see `image_blocks`)."""
        if layer_additions is not None:
            raise ValueError("Gemma 3's decoder takes no per-layer additions")
        T = embeds.shape[1]
        if kv_len is None and self.layers[0].self_attn.kv_cache is not None:
            start = int(positions[0]) if start is None else start
            kv_len = start + T
        start = start or 0
        rope = {False: self._cos_sin(positions, self.inv_freq, embeds.dtype),
                True: self._cos_sin(positions, self.local_inv_freq, embeds.dtype)}
        if positions.dim() == 2:                    # per-row positions: (B, 1, T, hd) against (B, H, T, hd)
            rope = {s: (c[:, None], si[:, None]) for s, (c, si) in rope.items()}
        specs = attention_specs(T, start, kv_len, self.cfg.sliding_window, blocks, embeds.device)
        x = embeds
        for layer in self.layers:
            device = layer.input_layernorm.weight.device
            if device != x.device:                  # split by --gpu-layers: cross once
                x = x.to(device)
                rope = {s: (c.to(device), si.to(device)) for s, (c, si) in rope.items()}
                specs = {s: a._replace(mask=None if a.mask is None else a.mask.to(device)) for s, a in specs.items()}
            cos, sin = rope[layer.sliding]
            x = layer(x, cos, sin, specs[layer.sliding])
        return self.norm(x.to(self.norm.weight.device))
