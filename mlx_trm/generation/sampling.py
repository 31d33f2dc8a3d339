"""Sampling: log-probabilities to token ids (mlx-lm's samplers, with settings checked up front)."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler as _mlx_lm_make_sampler

from ..config import ConfigError

Sampler = Callable[[mx.array], mx.array]  # log-probabilities [B, V] -> token ids [B]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (token history, logits) -> logits


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_sampler(temp: float = 0.0, top_p: float = 0.0, min_p: float = 0.0,
                 top_k: int = 0) -> Sampler:
    """mlx-lm's ``make_sampler`` (top-p, then min-p, then top-k, then temperature), with bad
    settings refused as one-line errors up front rather than mid-generation."""
    if temp < 0:
        raise ConfigError(f"temperature must be >= 0 (got {temp})")
    if top_k < 0 or not 0.0 <= top_p <= 1.0 or not 0.0 <= min_p <= 1.0:
        raise ConfigError(f"need top_k >= 0 and top_p, min_p in [0, 1] (got top_k={top_k}, "
                          f"top_p={top_p}, min_p={min_p})")
    if temp == 0:
        return greedy
    return _mlx_lm_make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
