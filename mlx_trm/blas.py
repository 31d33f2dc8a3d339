"""Which BLAS MLX's Linux CPU backend is using, and how to get the fast one.

The Linux ``mlx[cpu]`` wheel multiplies matrices with a slow reference BLAS (~6 GFLOP/s on two
cores); preloading Debian's OpenBLAS makes the same matmul ~30x faster. Apple silicon runs on
Metal and needs none of this.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
FIX = (f"sudo apt-get install libopenblas0-pthread && export LD_PRELOAD={OPENBLAS}")


def loaded_blas() -> str:
    """A short name of the BLAS in this process: 'openblas', 'accelerate', 'mkl' or 'reference'."""
    if platform.system() == "Darwin":
        return "accelerate"
    try:
        maps = Path("/proc/self/maps").read_text().lower()
    except OSError:
        return "unknown"
    # numpy ships its own OpenBLAS (numpy.libs/libscipy_openblas64_*, symbols renamed): MLX never
    # calls it, so it must not count as a fast BLAS for MLX.
    libraries = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    libraries = {p for p in libraries if "numpy.libs" not in p and "scipy_openblas" not in p}
    for name in ("openblas", "mkl", "blis"):
        if any(name in p for p in libraries):
            return name
    return "reference"


def blas_warning() -> str | None:
    """A one-line hint when MLX runs on the Linux CPU with the slow bundled BLAS."""
    if platform.system() != "Linux":
        return None
    if mx.default_device() != mx.cpu or loaded_blas() != "reference":
        return None
    return f"warning: MLX is using its slow bundled BLAS (~30x slower matmuls); fix: {FIX}"


def warn_if_slow_blas() -> None:
    """Print :func:`blas_warning` to stderr when it applies (the CLIs call this at start)."""
    warning = blas_warning()
    if warning:
        print(warning, file=sys.stderr)


def _openblas() -> ctypes.CDLL | None:
    """The process's OpenBLAS (preloaded or linked globally), if it exports its thread API."""
    if platform.system() != "Linux":
        return None
    try:
        lib = ctypes.CDLL(None)
        lib.openblas_get_num_threads, lib.openblas_set_num_threads  # noqa: B018
    except (OSError, AttributeError):
        return None
    return lib


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with OpenBLAS on ``n`` threads, then restore its setting (a no-op for any
    other BLAS, Apple's included).

    Decoding multiplies one row per prompt at a time: such a matmul is far too small to split,
    and OpenBLAS's idle workers spin (``sched_yield``) on the cores the decode step needs. With
    two cores, one thread makes a ``trm_tinystories_1m`` decode step ~1.3x faster.
    """
    lib = _openblas()
    if lib is None:
        yield
        return
    mx.synchronize()  # no matmul of queued work may run while the thread count changes
    before = lib.openblas_get_num_threads()
    lib.openblas_set_num_threads(n)
    try:
        yield
    finally:
        mx.synchronize()
        lib.openblas_set_num_threads(before)
