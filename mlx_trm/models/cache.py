"""Recursion-aware KV cache: one plain KV slot per layer application of a forward.

Every recursion stage of the model is causal, so running a new position through the stages in
order, appending its keys and values to the slot of each layer application, gives exactly the
full re-forward's result. The model consumes the slots in execution order.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one layer application, [B, H, T, Dh], grown in fixed-size blocks."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        needed = prev + keys.shape[2]
        if self.keys is None or needed > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            grow = ((needed - prev + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, Dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.keys[..., prev:needed, :] = keys
        self.values[..., prev:needed, :] = values
        self.offset = needed
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    @property
    def state(self) -> tuple[mx.array, mx.array] | list:
        if self.keys is None:
            return []
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
