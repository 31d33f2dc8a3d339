"""Samplers: functions of log-probabilities [B, V] -> token ids [B], as mlx-lm's make_sampler."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from .config import ConfigError

Sampler = Callable[[mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens; ties with the k-th are kept, as in the reference."""
    kth = mx.topk(logprobs, k, axis=-1).min(axis=-1, keepdims=True)
    return mx.where(logprobs < kth, -mx.inf, logprobs)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Nucleus: keep the most likely tokens until their probability reaches ``p``."""
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.exp(sorted_lp)
    mass_before = mx.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = mx.put_along_axis(mx.zeros(logprobs.shape, mx.bool_), order, mass_before < p, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens at least ``min_p`` times as likely as the most likely one."""
    threshold = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(min_p))
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


def make_sampler(temp: float = 0.0, top_p: float = 0.0, min_p: float = 0.0,
                 top_k: int = 0) -> Sampler:
    """A sampler for :func:`generate_step`; temperature 0 is greedy (the filters are moot).

    The filters act on the model's distribution (as mlx-lm's); the temperature then scales what
    is left. The random state is MLX's global one: ``mx.random.seed`` makes runs reproducible.
    """
    if temp < 0:
        raise ConfigError(f"temperature must be >= 0 (got {temp})")
    if top_k < 0 or not 0.0 <= top_p <= 1.0 or not 0.0 <= min_p <= 1.0:
        raise ConfigError(f"need top_k >= 0 and top_p, min_p in [0, 1] (got top_k={top_k}, "
                          f"top_p={top_p}, min_p={min_p})")
    if temp == 0:
        return greedy
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < top_p < 1:
        filters.append(lambda lp: apply_top_p(lp, top_p))
    if min_p > 0:
        filters.append(lambda lp: apply_min_p(lp, min_p))
    if top_k > 0:
        filters.append(lambda lp: apply_top_k(lp, top_k))

    def sample(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        return mx.random.categorical(logprobs * (1.0 / temp), axis=-1)

    return sample
