"""Decoders: prompts in, next-token logits out, over the recursion-aware cache (cache.py).

Every decoder has one interface (:class:`Decoder`): ``prefill()`` runs the prompts and returns
the logits [B, V] of their last position; ``step(y, sample)`` appends the tokens ``y`` [B] and
returns the next tokens, as a list of ``sample(logits)`` results: one for the fixed-depth and
adaptive decoders, up to K for the speculative one (speculative.py).

A step of a recursive model runs every layer application of every ACT step (56 for
``trm_tinystories_1m``). The reference's generation loop re-ran all of them over the whole
sequence for every new token (:class:`FullForwardDecoder` keeps that loop, for ``--no-cache``).
Every stage is causal, so a KV cache with one slot per layer application is exact:
:class:`CachedDecoder` prefills the prompt stage by stage, then runs each new position alone
through all stages. A decode step is dominated by per-operation overhead at this size, so it is
one ``mx.compile``-d function over fixed-capacity buffers (:func:`decode_step`): the write column
and the RoPE positions are arrays, and the trace is reused for every token. mlx-lm's own loop
gets the same compiled step through mlx_trm.interop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..kernels import kernels_setting
from .cache import CachePositions, KVSlot, make_cache, slots_over

CACHE_BLOCK = 256  # cache buffers hold prompt + max_tokens rounded up to this; grown by it
WINDOW_BLOCK = 64  # decode attention reads the written columns rounded up to this (a trace each)

Sample = Callable[[mx.array], tuple[mx.array, mx.array]]  # logits [N, V] -> (ids [N], logprobs)


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[mx.array, list[int]]:
    """Prompts as one [B, L] batch padded on the left with id 0, and the padding of each row."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty (no tokens); start it from the end-of-story token "
                         "(tokenizer.eos_id) to write a story from nothing")
    L = max(len(p) for p in prompts)
    padding = [L - len(p) for p in prompts]
    return mx.array([[0] * n + list(p) for n, p in zip(padding, prompts)], dtype=mx.int32), padding


# ----------------------------------------------------------------------------------------------
# Compiled functions, one per model and purpose

class CompiledTable(dict):
    """The compiled functions kept on a model. A copy of the model starts with none: a compiled
    function cannot be copied, and the original's would read the original's weights."""

    def __deepcopy__(self, memo: dict) -> CompiledTable:
        return CompiledTable()

    def __reduce__(self) -> tuple:
        return CompiledTable, ()


def compiled(model: nn.Module, key: Any, make: Callable[[], Callable]) -> Callable:
    """``make()`` compiled once per model and ``key``: a new closure per generation would be
    traced again before its first token (16 ms for trm_1m, 100 ms for MoEUT + ACT).

    The weights are inputs, not constants, so a model updated later (training) stays right. The
    table lives on the model (outside its parameters), so it goes when the model does: a table
    elsewhere would keep every model it compiled for alive, since a compiled function holds its
    inputs. A trace holds one set of kernel branches, so the ``MLX_TRM_KERNELS`` setting is part
    of the key (mlx_trm/kernels.py).
    """
    key = (key, kernels_setting())
    table = model.__dict__.get("_compiled")
    if table is None:
        table = CompiledTable()
        object.__setattr__(model, "_compiled", table)  # an attribute, not a child module
    if key not in table:
        table[key] = mx.compile(make(), inputs=model.state)
    return table[key]


# ----------------------------------------------------------------------------------------------
# The forward pieces every decoder is made of


def step_inputs(model: nn.Module, tokens: mx.array) -> mx.array:
    """Token ids [B, T] as the recursion takes them: one position of a dense model as rows [B]
    (no matmul reshapes its input and back: 4 operations fewer in each of 56 applications)."""
    if tokens.ndim == 1:
        tokens = tokens[:, None]
    if tokens.shape[1] == 1 and not model.args.use_moeut:
        return tokens[:, 0]
    return tokens


def run_act_steps(model: nn.Module, inputs: mx.array, z_H: mx.array, z_L: mx.array,
                  slots: Sequence[Any]) -> tuple[mx.array, mx.array]:
    """The ACT steps whose slots are ``slots`` (a multiple of one step's layer applications),
    from the latents ``(z_H, z_L)``: the model's recursion, step by step."""
    per_step = model.args.layer_applications_per_act_step
    caches: Iterator = iter(slots)
    for _ in range(len(slots) // per_step):
        z_H, z_L = model.refine(z_H, z_L, inputs, caches)
    return z_H, z_L


def decode_step(model: nn.Module) -> Callable:
    """New positions [B] or [B, T] through all slots, as a pure function of arrays: logits
    [B, T, V] and the new buffers (compilable)."""

    def step(tokens: mx.array, index: mx.array, left_padding: mx.array,
             keys: list[mx.array], values: list[mx.array], window: int | None = None):
        positions = CachePositions(index, left_padding, keys[0].shape[2], window)
        slots = slots_over(positions, keys, values)
        logits = model(tokens if tokens.ndim == 2 else tokens[:, None], cache=slots)
        return logits, [c.keys for c in slots], [c.values for c in slots]

    return step


def compiled_decode_step(model: nn.Module) -> Callable:
    return compiled(model, "decode", lambda: decode_step(model))


# ----------------------------------------------------------------------------------------------
# Decoders


class Decoder(ABC):
    """The interface of every decoder (see the module's docstring)."""

    @abstractmethod
    def prefill(self) -> mx.array:
        """Logits [B, V] of the prompts' last position."""

    @abstractmethod
    def __call__(self, tokens: mx.array) -> mx.array:
        """Logits [B, V] of the position after ``tokens`` [B]."""

    def step(self, y: mx.array, sample: Sample) -> list[tuple[mx.array, mx.array]]:
        return [sample(self(y))]


class CachedDecoder(Decoder):
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
        capacity = round_up(self.length + room, CACHE_BLOCK)
        self.positions, self.cache = make_cache(model.num_cache_slots, padding, capacity)
        self.prefill_step_size = prefill_step_size
        self.compile = compile
        self._step = compiled_decode_step(model) if compile else decode_step(model)

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

    def make_room(self, n: int) -> int:
        """Grow the buffers (a block at a time) until ``n`` more columns fit; return the
        attention window of a forward over them: the written columns rounded up to a block
        (one trace per block, and attention costs in proportion to the columns it reads)."""
        pos = self.positions
        while self.length + n > pos.capacity:  # unbounded generation: grow (retraces once)
            pos.grow(self.cache, CACHE_BLOCK)
        return min(round_up(self.length + n, WINDOW_BLOCK), pos.capacity)

    def run(self, step: Callable, tokens: mx.array, slots: list[KVSlot], *args: Any) -> Any:
        """``step(tokens, index, left_padding, *args, keys, values, window)`` over ``slots``,
        which take its new buffers; returns the rest of its outputs. The caller moves
        ``positions`` afterwards."""
        pos = self.positions
        T = 1 if tokens.ndim == 1 else tokens.shape[1]
        window = self.make_room(T)
        *out, keys, values = step(tokens, pos.index, pos.left_padding, *args,
                                  [c.keys for c in slots], [c.values for c in slots], window)
        for c, k, v in zip(slots, keys, values):
            c.keys, c.values = k, v
        return out

    def __call__(self, tokens: mx.array) -> mx.array:
        (logits,) = self.run(self._step, tokens, self.cache)
        self.advance(1)
        return logits[:, -1]

    def advance(self, n: int) -> None:
        """The last forward wrote ``n`` more positions of every slot: the next go after them."""
        self.positions.advance(n)
        self.length += n

    def rewind(self, n: int) -> None:
        """Forget the last ``n`` positions of every slot."""
        self.advance(-n)


class FullForwardDecoder(Decoder):
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
        _, cache = make_cache(self.model.num_cache_slots, self.padding, tokens.shape[1])
        return self.model(tokens, cache=cache)[:, -1]

    def __call__(self, tokens: mx.array) -> mx.array:
        self.tokens = mx.concatenate([self.tokens, tokens[:, None].astype(mx.int32)], axis=1)
        return self.prefill()
