"""MLX's Linux CPU backend made fast: which BLAS it uses (and how to get the fast one), and the
allocator setting that keeps large buffers out of fresh pages.

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

from .kernels import kernels_setting

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


def prepare_cpu_backend() -> None:
    """Print :func:`blas_warning` to stderr when it applies, and keep freed large buffers for
    reuse (:func:`reuse_large_buffers`). The CLIs and benchmarks call this at start, so a bad
    ``MLX_TRM_KERNELS`` is also refused here, before any work (a ``ConfigError``)."""
    kernels_setting()
    warning = blas_warning()
    if warning:
        print(warning, file=sys.stderr)
    reuse_large_buffers()


def reuse_large_buffers() -> bool:
    """On Linux, have glibc serve large buffers from its heap and keep them when freed.

    MLX's CPU backend allocates with ``malloc``; glibc maps every buffer over 32 MB as fresh
    pages and unmaps it on free, so each [64, 512, 1024] activation is
    paid again in page faults: ``x * 0.5`` on 82M floats takes 330 ms, and 48 ms with this
    setting (2-core x86). The price is resident memory: freed buffers stay with the process, as
    MLX's Metal allocator keeps its buffer cache. Returns whether glibc took the setting.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    return bool(libc.mallopt(m_mmap_threshold, 2**31 - 1)
                and libc.mallopt(m_trim_threshold, 2**31 - 1))


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
