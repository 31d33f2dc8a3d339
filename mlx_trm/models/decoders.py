"""Decoders: prompts in, next-token logits [B, V] out, one call per new token.

A step of a recursive model runs every layer application of every ACT step (56 for
``trm_tinystories_1m``). The original training repository's generation loop re-ran all of them
over the whole sequence for every new token (``FullForwardDecoder`` keeps that loop, for
``--no-cache``). Every stage is causal, so a KV cache with one slot per layer application is
exact (cache.py): ``CachedDecoder`` prefills the prompt stage by stage, then runs each new position
alone through all stages. A decode step is dominated by per-operation overhead at this size, so it
is one ``mx.compile``-d function over fixed-capacity buffers: the write column and the RoPE
positions are arrays, and the trace is reused for every token. mlx-lm's own loop
(``mlx_lm.generate``, its batched generation, the server) gets the same compiled step through
:func:`decode_into_kv_cache`, on the buffers of its stock ``KVCache`` / ``BatchKVCache`` slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as lm_cache

from ..kernels import kernels_setting
from .cache import BatchKVCache, CachePositions, grow_batch_cache, make_batch_cache

CACHE_BLOCK = 256  # cache buffers hold prompt + max_tokens rounded up to this; grown by it
WINDOW_BLOCK = 64  # decode attention reads the written columns rounded up to this (a trace each)


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[mx.array, list[int]]:
    """Prompts as one [B, L] batch padded on the left with id 0, and the padding of each row."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty (no tokens); the model adds no BOS, so generation "
                          "needs at least one prompt token")
    L = max(len(p) for p in prompts)
    padding = [L - len(p) for p in prompts]
    return mx.array([[0] * n + list(p) for n, p in zip(padding, prompts)], dtype=mx.int32), padding


def _decode_step(model: nn.Module) -> Callable:
    """One decode step through all cache slots, as a pure function of arrays (compilable)."""

    def step(tokens: mx.array, index: mx.array, left_padding: mx.array,
             keys: list[mx.array], values: list[mx.array], window: int | None = None):
        positions = CachePositions(index, left_padding, keys[0].shape[2], window)
        cache = [BatchKVCache(positions, k, v) for k, v in zip(keys, values)]
        logits = model(tokens[:, None], cache=cache)[:, -1]
        return logits, [c.keys for c in cache], [c.values for c in cache]

    return step


def compiled_decode_step(model: nn.Module) -> Callable:
    """The model's compiled decode step, made once per model: a new closure per generation
    would be traced again before its first token (16 ms for trm_1m, 100 ms for MoEUT+ACT).
    One per kernels setting (mlx_trm/kernels.py): a trace holds one set of branches."""
    steps = model.__dict__.setdefault("_compiled_decode_step", {})
    key = kernels_setting()
    if key not in steps:
        # the weights are inputs, not constants: a model updated later (training) stays right
        steps[key] = mx.compile(_decode_step(model), inputs=model.state)
    return steps[key]


def _write_column(slot: object) -> int | None:
    """The buffer column a stock mlx-lm slot writes next, or None if the compiled step cannot
    take it: a ``KVCache`` or a left-padded ``BatchKVCache`` that holds keys (and is not in the
    middle of a right-padded prefill); never quantized or rotating ones."""
    if type(slot) is lm_cache.KVCache and slot.keys is not None:
        return slot.offset
    if (type(slot) is lm_cache.BatchKVCache and slot.keys is not None
            and getattr(slot, "_right_padding", None) is None):
        return slot._idx
    return None


def is_plain_kv_cache(cache: Sequence) -> bool:
    """Every slot a stock mlx-lm ``KVCache`` (``mlx_lm.generate``) or ``BatchKVCache`` (its
    batched generation and the server), all of one type, position and capacity."""
    first = cache[0]
    column = _write_column(first)
    return column is not None and all(
        type(c) is type(first) and _write_column(c) == column
        and c.keys.shape[2] == first.keys.shape[2] for c in cache[1:])


def decode_into_kv_cache(model: nn.Module, tokens: mx.array, cache: Sequence) -> mx.array:
    """One new position [B, 1] through all slots of a stock mlx-lm cache: logits [B, 1, V].

    The compiled step of ``CachedDecoder`` runs on the slots' own buffers (mlx-lm keeps them a
    block longer than what is written, and columns past the write column are masked; a
    ``BatchKVCache``'s left padding is masked as its own mask does), then each slot takes the
    new buffers and advances, exactly as ``update_and_fetch`` would have left it. mlx-lm would
    otherwise run the step eagerly, dispatching every operation of every layer application
    from Python.
    """
    first = cache[0]
    column = _write_column(first)
    if column + 1 > first.keys.shape[2]:  # full: grow every slot by mlx-lm's own step
        for c in cache:
            k, v = c.keys[..., :column, :], c.values[..., :column, :]
            c.keys = mx.concatenate([k, mx.zeros((*k.shape[:2], c.step, k.shape[3]), k.dtype)], 2)
            c.values = mx.concatenate(
                [v, mx.zeros((*v.shape[:2], c.step, v.shape[3]), v.dtype)], 2)
    batched = type(first) is lm_cache.BatchKVCache
    B = tokens.shape[0]
    left_padding = (first.left_padding.astype(mx.int32) if batched
                    else mx.zeros((B,), dtype=mx.int32))
    window = min(-(-(column + 1) // WINDOW_BLOCK) * WINDOW_BLOCK, first.keys.shape[2])
    logits, keys, values = compiled_decode_step(model)(
        tokens[:, 0], mx.array(column, dtype=mx.int32), left_padding,
        [c.keys for c in cache], [c.values for c in cache], window)
    for c, k, v in zip(cache, keys, values):
        c.keys, c.values = k, v
        c.offset = c.offset + 1
        if batched:
            c._idx = column + 1
    return logits[:, None]


class CachedDecoder:
    """Prefill the prompts stage by stage into the recursion-aware cache, then decode one
    position per call through all stages (compiled by default)."""

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                 compile: bool = True, prefill_step_size: int = 512):
        self.model = model
        self.tokens, padding = left_pad(prompts)
        self.length = self.tokens.shape[1]  # columns written once the prompt is in
        # Room for the whole generation up front (one trace), within reason: beyond it the
        # buffers grow a block at a time.
        room = min(max_tokens, 8 * CACHE_BLOCK) if max_tokens > 0 else CACHE_BLOCK
        capacity = -(-(self.length + room) // CACHE_BLOCK) * CACHE_BLOCK
        self.positions, self.cache = make_batch_cache(model.num_cache_slots, padding, capacity)
        self.prefill_step_size = prefill_step_size
        self._step = compiled_decode_step(model) if compile else _decode_step(model)

    def prefill(self) -> mx.array:
        L, n = self.length, self.prefill_step_size
        for start in range(0, L, n):
            chunk = self.tokens[:, start:start + n]
            self.positions.window = start + chunk.shape[1]
            logits = self.model(chunk, cache=self.cache)[:, -1]
            self.positions.advance(chunk.shape[1])
            if start + n < L:  # keep the graph of a long prompt small
                mx.eval([c.state for c in self.cache])
        return logits

    def __call__(self, tokens: mx.array) -> mx.array:
        pos = self.positions
        if self.length + 1 > pos.capacity:  # unbounded generation: grow (retraces once)
            grow_batch_cache(pos, self.cache, CACHE_BLOCK)
        keys = [c.keys for c in self.cache]
        values = [c.values for c in self.cache]
        # Attend over the written columns rounded up to a block: one trace per block, and a
        # step's attention costs in proportion to the columns it reads.
        window = -(-(self.length + 1) // WINDOW_BLOCK) * WINDOW_BLOCK
        logits, keys, values = self._step(tokens, pos.index, pos.left_padding, keys, values,
                                          min(window, pos.capacity))
        for c, k, v in zip(self.cache, keys, values):
            c.keys, c.values = k, v
        pos.advance(1)
        self.length += 1
        return logits


class FullForwardDecoder:
    """The reference's loop (``--no-cache``): re-run the whole sequence so far for every token.

    The reference right-pads to 512 and reads the logits at the last filled position; causality
    makes those equal to the last logits of the unpadded sequence, so no padding is run.
    """

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], max_tokens: int, **_):
        self.model = model
        self.tokens, self.padding = left_pad(prompts)

    def prefill(self) -> mx.array:
        tokens = self.tokens
        if not any(self.padding):
            return self.model(tokens)[:, -1]
        # Rows of different lengths: a throwaway cache supplies the padding mask and positions.
        _, cache = make_batch_cache(self.model.num_cache_slots, self.padding, tokens.shape[1])
        return self.model(tokens, cache=cache)[:, -1]

    def __call__(self, tokens: mx.array) -> mx.array:
        self.tokens = mx.concatenate([self.tokens, tokens[:, None].astype(mx.int32)], axis=1)
        return self.prefill()
