"""foveal's own CPU kernel for int8 decode (`gemv.c`), compiled on first use for this machine.

Why: decode is one row of activations, so its speed is how fast each weight streams through.
PyTorch's `_weight_int8pack_mm` reads an int8 weight at 12-15 GB/s on this project's 2-core machine;
`gemv.c` reads it at ~22 GB/s (measured: a Qwen2-0.5B-shaped int8 decode step went from ~45 to
~35 ms). PyTorch has no faster one-row int8 kernel to call, so this is the one hand-written kernel.
(An int4 kernel written the same way, with the codes decoded through a 16-entry table and bf16
dot products, only matched `_weight_int4pack_mm_for_cpu` here, 12-17 GB/s: both are bound by the
decoding work on 2 cores, not by memory; so int4 keeps PyTorch's.)

How:
- The C file ships in the package. The first int8 decode compiles it with the system C compiler
  (`$CC`, else `cc`) and `-O3 -march=native -fopenmp` into `~/.cache/foveal/native/` (or
  `$FOVEAL_CACHE/native/`), named by a hash of the source, the compiler, the flags and the CPU's
  features; later processes load that file (~0.2 s to build, once).
- Anything that goes wrong (no compiler, a compile error, a library that does not load, a
  self-check that disagrees with PyTorch) logs one warning and foveal keeps using PyTorch's kernel.
  `FOVEAL_NATIVE=0` switches the kernel off.
- It is called through ctypes, which releases the GIL; OpenMP shares PyTorch's libgomp and uses
  `torch.get_num_threads()` threads. A torch.compile'd decode step calls it as the custom
  operator `foveal::int8_gemv`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("foveal")

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_TRIED = False


def enabled() -> bool:
    return os.environ.get("FOVEAL_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("FOVEAL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "foveal"
    return Path(root) / "native"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def build(out_dir: Path | None = None) -> Path:
    """Compile gemv.c (if not already built with the same source, compiler, flags and CPU) and return the
    library's path. Raises RuntimeError with the compiler's message on failure."""
    cc = _compiler()
    source = SOURCE.read_bytes()
    # -march=native: the library is only good for this CPU, so its features are part of the name
    key = hashlib.sha256(source + repr((cc, FLAGS, platform.machine(), _cpu_features())).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"gemv-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)     # built aside, then renamed: no half file
    os.close(fd)
    try:
        try:
            r = subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"could not run the C compiler {' '.join(cc)!r}: {e}") from e
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-600:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.foveal_gemv_int8_bf16.argtypes = [p, p, p, p, i64, i64, ctypes.c_int]
    lib.foveal_gemv_int8_bf16.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (switched off, or it failed once in this process: the
    reason was logged)."""
    global _LIB, _TRIED
    if not enabled():
        return None
    if not _TRIED:
        with _LOCK:
            if not _TRIED:
                try:
                    _LIB = _load()
                    _self_check()
                except (RuntimeError, OSError, AttributeError, AssertionError) as e:
                    _LIB = None
                    log.warning("foveal's int8 decode kernel is not available (%s); using PyTorch's kernel", e)
                _TRIED = True
    return _LIB


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y (..., N) bf16 = x (..., K) bf16 with one row @ (weight int8 [N, K] * scales [N]).T.
    The caller checks `library()` and the layouts (CPU, contiguous weight, bf16 scales)."""
    N, K = weight.shape
    xc = x.reshape(K).contiguous()
    y = torch.empty(N, dtype=torch.bfloat16)
    if _LIB.foveal_gemv_int8_bf16(weight.data_ptr(), scales.data_ptr(), xc.data_ptr(), y.data_ptr(), N, K,
                                  torch.get_num_threads()):
        raise MemoryError("foveal's int8 kernel could not allocate its scratch row")
    return y.view(*x.shape[:-1], N)


def _self_check() -> None:
    """Compare the kernel with PyTorch on one odd-sized product (tail handling, threads, rounding)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, (37, 101), generator=g, dtype=torch.int8)
    s = (torch.rand(37, generator=g) / 100).bfloat16()
    x = torch.randn(1, 101, generator=g).bfloat16()
    ref = (x.float() @ w.float().t()) * s.float()
    got = int8_gemv(x, w, s).float()
    assert torch.allclose(got, ref, rtol=1e-2, atol=1e-2), f"self-check differs from PyTorch by {(got - ref).abs().max()}"


def ready() -> bool:
    """Whether the kernel is loaded, without trying to build it; what a torch.compile trace reads
    (layers call `library()` when they are packed at load, so this is settled before any trace)."""
    return _LIB is not None


# The same kernel as a PyTorch operator, so that a torch.compile'd decode step calls it too.
@torch.library.custom_op("foveal::int8_gemv", mutates_args=())
def int8_gemv_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return int8_gemv(x, weight, scales)


@int8_gemv_op.register_fake
def _(x, weight, scales):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
