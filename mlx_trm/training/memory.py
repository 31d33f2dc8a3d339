"""Will a training step fit in memory? Measure it on smaller micro-batches before the run starts.

A step's peak memory grows nearly linearly with the rows of a micro-batch: the weights and
optimizer state are fixed, every activation is per token. So instead of a formula per
architecture (the MoE, the CPU's unfused attention and MLX's own scheduling all move it),
:func:`fit_memory` runs the forward and backward of one ACT step on an eighth and a quarter of
the micro-batch (:func:`probe_rows`) at the real sequence length, reads MLX's peak-memory
counter, and extrapolates to the run's micro-batch. The loss's row chunk is scaled with the
rows so that its share extrapolates too.

``train.checkpoint_activations`` (None, the default, means "when needed") turns recomputation
of the layer activations on when the step would not fit the device's recommended working set
without it; when even that does not fit, a warning names the ``train.grad_accum_steps`` that
would.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import Config
from ..kernels import metal_kernels
from ..models import Model, initial_carry, step_loss
from ..models.loss import plan_chunk_rows

GB = 1e9
# The probes run uncompiled; a compiled step's peak has come out up to ~25% above the estimate
# (MLX schedules the fused graph differently), so the estimate is compared with some room.
MARGIN = 1.25


def device_memory_limit() -> tuple[int, str]:
    """(bytes, where from): the GPU's recommended working set on a Mac, else the machine's RAM."""
    try:
        info = mx.device_info()
    except Exception:  # older MLX, or no information for this device
        info = {}
    if metal_kernels() and info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"]), "the GPU's recommended working set"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = int(info.get("memory_size", 0))
    return ram, "the machine's RAM"


def _probe_peak(model: Model, rows: int, seq_len: int, chunk_rows: int) -> int:
    """Peak bytes of one uncompiled forward + backward of an ACT step on ``rows`` rows."""
    carry = initial_carry(model, rows, seq_len)
    tokens = mx.ones((rows, seq_len), dtype=mx.int32)

    def loss_fn(carry):  # the training step's loss, uncompiled
        return step_loss(model, carry, tokens, tokens, training=True, key=mx.random.key(0),
                         chunk_rows=chunk_rows)[1]

    mx.eval(carry)
    mx.synchronize()
    mx.reset_peak_memory()
    loss, grads = nn.value_and_grad(model, loss_fn)(carry)
    mx.eval(loss, grads)
    peak = mx.get_peak_memory()
    del loss, grads
    mx.clear_cache()
    return peak


def probe_rows(micro_rows: int) -> tuple[int, int]:
    """The two micro-batch sizes to measure: an eighth and a quarter of the run's, at least 1
    and 2 rows. A step's memory is linear in the rows only beyond a few rows: the 10M MoEUT's
    uncompiled step peaked at 0.29, 0.46, 0.68, 0.98 and 1.39 GB on 1, 2, 4, 8 and 16 rows of
    512 tokens and 4.09 GB on 64, so 1 and 2 rows predicted 2.8 GB for 64, 8 and 16 rows 3.4."""
    small = max(1, micro_rows // 8)
    return small, 2 * small


def step_peak(model: Model, micro_rows: int, seq_len: int) -> tuple[float, float]:
    """(fixed bytes, bytes per row) of a training step, measured on two smaller micro-batches."""
    run_rows = micro_rows * seq_len
    run_chunk = plan_chunk_rows(run_rows, model.args.vocab_size, training=True)

    def probe_chunk(r: int) -> int:  # the run's loss path, its chunk scaled with the rows
        return r * seq_len if run_chunk >= run_rows else max(1, round(run_chunk * r / micro_rows))

    small, large = probe_rows(micro_rows)
    peaks = [_probe_peak(model, r, seq_len, probe_chunk(r)) for r in (small, large)]
    per_row = max(peaks[1] - peaks[0], 0) / (large - small)
    return peaks[0] - per_row * small, per_row


def fitting_accum(fixed: float, per_row: float, rows: int, limit: float) -> int | None:
    """The fewest ``grad_accum_steps`` (dividing ``rows``) whose micro-batch fits ``limit``."""
    for accum in range(1, rows + 1):
        if rows % accum == 0 and fixed + per_row * rows / accum <= limit:
            return accum
    return None


def fit_memory(model: Model, config: Config, ranks: int = 1, warn: bool = True,
               limit: int | None = None) -> dict[str, Any]:
    """Decide ``model.checkpoint_activations`` and warn when the step will not fit ``limit``.

    Returns what it measured (GB) and decided. Call it after the model and the optimizer state
    exist (both count) and before the first step.
    """
    tc, seq_len = config.train, config.model.seq_len
    rows = tc.global_batch_size // ranks
    micro = rows // tc.grad_accum_steps
    where = "the given limit"
    if limit is None:
        limit, where = device_memory_limit()
    wanted = tc.checkpoint_activations
    model.checkpoint_activations = bool(wanted)
    fixed, per_row = step_peak(model, micro, seq_len)
    if wanted is None and (fixed + per_row * micro) * MARGIN > limit:
        model.checkpoint_activations = True  # recomputing is cheaper than not fitting at all
        fixed, per_row = step_peak(model, micro, seq_len)
    peak = (fixed + per_row * micro) * MARGIN
    result = {"estimated_peak_gb": peak / GB, "limit_gb": limit / GB,
              "checkpoint_activations": model.checkpoint_activations}
    if peak > limit and warn:
        accum = fitting_accum(fixed, per_row, rows, limit / MARGIN)
        fix = (f"set train.grad_accum_steps={accum} (micro-batches of {rows // accum} rows)"
               if accum else "even one row per micro-batch needs about "
               f"{(fixed + per_row) * MARGIN / GB:.1f} "
               "GB: lower model.seq_len")
        if not model.checkpoint_activations and accum != 1:
            fix += " or train.checkpoint_activations=true"
        print(f"warning: a training step needs about {peak / GB:.1f} GB ({micro} rows x "
              f"{seq_len} tokens per micro-batch) but {where} is {limit / GB:.1f} GB; {fix}",
              file=sys.stderr)
    return result
