"""Activation checkpointing: keep a layer's input, recompute its activations in the backward.

``nn.utils.checkpoint`` (``mx.checkpoint``) saves no memory in a recursive model: the layer's
parameters are shared by all 14 applications, so each application's weight gradient is only
summed at the very end, and until then MLX keeps every application's recomputed activations
that the weight gradient reads (measured: 8 applications of the 1M SwiGLU keep 0.87 GB of the
uncheckpointed 1.03 GB). Here the backward of one application (a) starts only once its output
cotangent exists and (b) hands on its input gradient only after its weight gradients are
computed, so one application's activations are alive at a time (0.46 GB in the same test).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


def checkpoint(module: nn.Module, fn: Callable[..., tuple[mx.array, ...]]
               ) -> Callable[..., tuple[mx.array, ...]]:
    """``fn(*inputs)`` (a tuple of arrays, reading ``module``'s trainable parameters) that
    stores only its inputs and outputs for the backward pass."""

    def call(*inputs: mx.array) -> tuple[mx.array, ...]:
        names, params = zip(*tree_flatten(module.trainable_parameters()))
        n = len(params)

        def run(*arrays: mx.array) -> tuple[mx.array, ...]:
            module.update(tree_unflatten(list(zip(names, arrays[:n]))))
            try:
                return tuple(fn(*arrays[n:]))
            finally:
                module.update(tree_unflatten(list(zip(names, params))))

        forward = mx.custom_function(run)

        @forward.vjp
        def backward(primals, cotangents, outputs):
            cotangents = list(cotangents)
            primals = mx.depends(list(primals), cotangents)  # (a)
            _, grads = mx.vjp(run, primals, cotangents)
            grads = list(grads)
            grads[n:] = mx.depends(grads[n:], grads[:n])  # (b)
            return tuple(grads)

        return forward(*params, *inputs)

    return call
