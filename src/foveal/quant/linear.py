"""Weight-only quantized linear layers: `Int8Linear` (per output channel) and `Int4Linear` (group-wise).

Design decisions (after gpt-fast's quantize.py):
- Each is a drop-in replacement for `nn.Linear` holding its own buffers; the state dict holds a
  portable layout (documented below) that does not depend on the PyTorch release.
- Decode (few rows, bf16 activations, CPU) uses PyTorch's packed kernels
  `torch._weight_int8pack_mm` / `torch._weight_int4pack_mm_for_cpu`, except one row of int8
  (decode), which takes foveal's own kernel when it compiled (`native.py`: ~1.5x the read speed);
  prefill (many rows), fp32 activations, other devices and shapes the kernels refuse dequantize to
  the activation dtype and call `F.linear` (bf16 matmuls run on AMX about 15x faster than the
  packed kernels with many rows).
- The int4 CPU kernel wants its weight in a private packed layout that changed between releases.
  `pack()` converts once and keeps a single copy; the layouts this module knows (torch 2.13:
  `[N/B, K, B/2]` bytes, row n in the low nibble and row n+B/2 in the high one, with B = 64 on
  AVX-512 CPUs and 32 on AVX2 ones) are told apart by a probe at first use, and when none fits
  the module stays on the fallback path.
- `fast = False` on a module (see `set_fast_path`) forces the fallback; tests compare the two.

Portable layouts (what checkpoints hold):
- int8: `weight` int8 [N, K], `scales` [N]; w = weight * scales[:, None] (symmetric).
- int4: `weight` uint8 [N, K/2], byte j of row n holds k = 2j (low nibble) and 2j + 1 (high);
  `scales`, `zeros` [N, K/group]; w = (q - 8) * scale + zero for q in [0, 15] (symmetric: zero = 0).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native

# Above this many rows the packed kernels lose to dequantize + bf16 matmul (peers.md: ~0.15 vs
# ~2.5 TFLOP/s); decode has 1 row per sequence.
MAX_FAST_ROWS = 16
BLOCK_ROWS = 4096           # quantizing works on this many rows at a time (a 150k-row head: 37 blocks)
GROUP_SIZES = (32, 64, 128, 256)


def _native_ready() -> bool:
    # a torch.compile trace reads the settled state only (no build, no environment)
    return native.ready() if torch.compiler.is_compiling() else native.library() is not None


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T + bias with an int8 [N, K] weight."""

    mode = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.fast = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, **_) -> "Int8Linear":
        w = linear.weight.detach()
        dtype = w.dtype if w.is_floating_point() else torch.float32
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, w.device)
        for r in range(0, w.shape[0], BLOCK_ROWS):       # float32 temporaries of one block of rows only
            block = w[r:r + BLOCK_ROWS].float()
            # scales rounded to the stored dtype first, so the rounding of the scale costs nothing extra
            scales = (block.abs().amax(dim=1) / 127).clamp(min=1e-10).to(dtype)
            mod.weight[r:r + BLOCK_ROWS] = (block / scales.float()[:, None]).round().clamp(-128, 127)
            mod.scales[r:r + BLOCK_ROWS] = scales
        if linear.bias is not None:
            mod.bias = linear.bias.detach().to(dtype).clone()
        return mod

    def pack(self) -> None:
        """`_weight_int8pack_mm` reads the portable layout, but crashes on a weight that is not
        64-byte aligned (an mmap view into a safetensors file): copy such a weight once."""
        if self.weight.device.type == "cpu" and (self.weight.data_ptr() % 64 or not self.weight.is_contiguous()):
            self.weight = self.weight.contiguous().clone()
        if self.weight.device.type == "cpu":
            native.library()            # build / load foveal's kernel now, not inside a compiled trace

    def uses_fast_path(self, x: torch.Tensor) -> bool:
        return (self.fast and x.device.type == "cpu" and x.dtype == torch.bfloat16 and _rows(x) <= MAX_FAST_ROWS
                and hasattr(torch, "_weight_int8pack_mm"))

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

    def uses_native(self, x: torch.Tensor) -> bool:
        """One row of bf16 on the CPU: foveal's own kernel (`native.py`), when it built."""
        return (self.fast and x.device.type == "cpu" and x.dtype == torch.bfloat16 and _rows(x) == 1
                and self.weight.is_contiguous() and self.scales.dtype == torch.bfloat16 and _native_ready())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_native(x):
            gemv = native.int8_gemv_op if torch.compiler.is_compiling() else native.int8_gemv
            y = gemv(x, self.weight, self.scales)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.uses_fast_path(x):
            try:
                y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight,
                                              self.scales.to(x.dtype)).view(*x.shape[:-1], -1)
                return y if self.bias is None else y + self.bias.to(y.dtype)
            except RuntimeError:
                self.fast = False      # this build refuses the op: stay on the fallback from now on
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---- int4 -------------------------------------------------------------------------------
def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in [0, 15] -> uint8 [N, K/2] (k even: low nibble, k odd: high nibble)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K]."""
    return torch.stack([p & 15, p >> 4], dim=-1).view(p.shape[0], -1)


def _to_cpu_pack(q: torch.Tensor, block: int) -> torch.Tensor:
    """The layout torch 2.13's `_convert_weight_to_int4pack_for_cpu` gives for N % block == 0, where its
    kernel works on `block` rows at a time (64 with AVX-512, 32 with AVX2)."""
    N, K = q.shape
    b = q.to(torch.uint8).view(N // block, 2, block // 2, K).transpose(-1, -2)    # (N/block, 2, K, block/2)
    return (b[:, 0] | (b[:, 1] << 4)).reshape(N, K // 2)


def _from_cpu_pack(p: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `_to_cpu_pack`: packed uint8 [N, K/2] -> q uint8 [N, K]."""
    N, K = p.shape[0], p.shape[1] * 2
    b = p.view(N // block, K, block // 2)
    return torch.stack([b & 15, b >> 4], dim=1).transpose(-1, -2).reshape(N, K)


_CPU_INT4_BLOCK: int | None = None      # rows per block of the CPU kernel's layout; 0: no usable kernel


def cpu_int4_block() -> int:
    """The block of `_to_cpu_pack` that the int4 CPU kernel packs with, once it computes right (probed
    once); 0 where the kernel is missing or packs a layout this module does not know."""
    global _CPU_INT4_BLOCK
    if _CPU_INT4_BLOCK is None:
        try:
            g = torch.Generator().manual_seed(0)
            q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=g)
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            block = next((b for b in (64, 32) if packed.dtype == torch.uint8 and
                          torch.equal(packed, _to_cpu_pack(q, b))), 0)
            x = torch.randn(2, 64, generator=g).bfloat16()
            sz = torch.stack([torch.full((2, 128), 0.5), torch.full((2, 128), 0.25)], -1).bfloat16()
            y = torch._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
            ref = x.float() @ ((q.float() - 8) * 0.5 + 0.25).t()
            _CPU_INT4_BLOCK = block if torch.allclose(y.float(), ref, atol=0.5, rtol=2e-2) else 0
        except (AttributeError, RuntimeError, TypeError):
            _CPU_INT4_BLOCK = 0
    return _CPU_INT4_BLOCK


def cpu_int4_available() -> bool:
    """Whether the int4 CPU kernel exists and packs a layout `_to_cpu_pack` knows (probed once)."""
    return cpu_int4_block() > 0


class Int4Linear(nn.Module):
    """Group-wise 4-bit weights: w = (q - 8) * scale + zero per group of `group_size` inputs."""

    mode = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64,
                 dtype=torch.bfloat16, device=None):
        super().__init__()
        if group_size not in GROUP_SIZES or in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide {in_features} inputs")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.fast = True
        self.packed = False          # weight holds the CPU kernel's layout (see pack())
        self._scales_zeros: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, symmetric: bool = False) -> "Int4Linear":
        w = linear.weight.detach()
        dtype = w.dtype if w.is_floating_point() else torch.float32
        N, K = w.shape
        mod = cls(K, N, linear.bias is not None, group_size, dtype, w.device)
        for r in range(0, N, BLOCK_ROWS):                # float32 temporaries of one block of rows only
            g = w[r:r + BLOCK_ROWS].float().view(-1, K // group_size, group_size)
            if symmetric:
                scales = (g.abs().amax(-1) / 7).clamp(min=1e-10).to(dtype)
                zeros = torch.zeros_like(scales)
            else:
                lo, hi = g.amin(-1), g.amax(-1)
                scales = ((hi - lo) / 15).clamp(min=1e-10).to(dtype)
                zeros = (lo + 8 * scales.float()).to(dtype)
            q = ((g - zeros.float()[..., None]) / scales.float()[..., None] + 8).round().clamp(0, 15)
            mod.weight[r:r + BLOCK_ROWS] = pack_nibbles(q.view(-1, K))
            mod.scales[r:r + BLOCK_ROWS], mod.zeros[r:r + BLOCK_ROWS] = scales, zeros
        if linear.bias is not None:
            mod.bias = linear.bias.detach().to(dtype).clone()
        return mod

    # ---- layouts ----------------------------------------------------------------------
    def can_pack(self) -> bool:
        return (self.weight.device.type == "cpu" and self.out_features % 64 == 0 and cpu_int4_available())

    def pack(self) -> None:
        """Convert the weight to the CPU kernel's layout in place (one copy), if the kernel fits."""
        if self.packed or not self.fast or not self.can_pack():
            return
        q = unpack_nibbles(self.weight).to(torch.int32)
        self.weight = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        self.packed = True
        # (K/group, N, 2) as the kernel wants; scales / zeros become views of it (no extra copy)
        sz = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).contiguous()
        self._scales_zeros = sz
        self.scales, self.zeros = sz[..., 0].t(), sz[..., 1].t()

    def q(self) -> torch.Tensor:
        """The 4-bit codes, uint8 [N, K], whatever the current layout."""
        return _from_cpu_pack(self.weight, cpu_int4_block()) if self.packed else unpack_nibbles(self.weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "weight"] = pack_nibbles(self.q())

    # ---- compute ----------------------------------------------------------------------
    def uses_fast_path(self, x: torch.Tensor) -> bool:
        return (self.fast and self.packed and x.device.type == "cpu" and x.dtype == torch.bfloat16
                and _rows(x) <= MAX_FAST_ROWS)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        N, K, gs = self.out_features, self.in_features, self.group_size
        q = self.q().view(N, K // gs, gs).to(dtype) - 8
        return (q * self.scales.to(dtype)[..., None] + self.zeros.to(dtype)[..., None]).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_fast_path(x):
            y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.group_size,
                                                  self._scales_zeros.to(x.dtype)).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, packed={self.packed}")


QUANTIZED = (Int8Linear, Int4Linear)
