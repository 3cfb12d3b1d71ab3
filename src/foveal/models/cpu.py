"""Which CPU kernel a bf16 matmul takes: PyTorch's own matrix-vector product for one row, oneDNN
for many.

Why (measured on this project's 2-core machine, weights not cache-resident, torch 2.13):
- With oneDNN on (PyTorch's default), `F.linear` on one bf16 row reads the weight at 10-13 GB/s,
  a third of the machine's bandwidth: a 4864x896 projection takes 830 us. With oneDNN off the
  same call takes PyTorch's vectorised gemv and reads at 20-28 GB/s (315 us). Decode is one row
  per step, so its speed is this number.
- With oneDNN off, many rows (prefill, the vision tower) run ~10x slower (600 rows: 160 ms
  instead of 15 ms for the same weight).

The switch (`torch._C._set_mkldnn_enabled`) is process-wide, not per thread. So it is flipped
only while holding a process-wide lock, and every foveal forward on CPU holds the same lock:
no foveal computation in another thread (another model's prefill in the server) ever runs in
the window where oneDNN is off. CPU compute in one process is serialised by this; on CPU the
threads would share the same cores anyway.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_LOCK = threading.RLock()
_SWITCH = hasattr(torch._C, "_set_mkldnn_enabled") and hasattr(torch._C, "_get_mkldnn_enabled")


def one_row_wants_native(dtype: torch.dtype) -> bool:
    """Whether a one-row matmul of this dtype is faster with oneDNN off (bf16; fp16 and fp32
    already take PyTorch's / MKL's kernels)."""
    return _SWITCH and dtype == torch.bfloat16


@contextmanager
def matmuls(x: torch.Tensor, rows: int):
    """Run the enclosed forward with the matmul kernel that suits `rows` rows of `x`'s dtype.

    Nothing happens off the CPU. One row of bf16: oneDNN is off inside (and back to what it
    was after). Anything else: oneDNN is left as the user set it, and the lock only keeps this
    forward out of another thread's one-row window."""
    if x.device.type != "cpu":
        yield
        return
    with _LOCK:
        if rows != 1 or not one_row_wants_native(x.dtype) or not torch._C._get_mkldnn_enabled():
            yield
            return
        torch._C._set_mkldnn_enabled(False)
        try:
            yield
        finally:
            torch._C._set_mkldnn_enabled(True)
