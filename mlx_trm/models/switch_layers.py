"""Sort-gather-matmul: every (token, slot) assignment multiplied by its own expert's matrix.

The ``[N, k]`` expert choices are flattened and sorted by expert, each assignment's input row is
gathered once, and ``mx.gather_mm(..., sorted_indices=True)`` multiplies every row with its
expert's matrix: k/E of the compute of running every expert on every token (as the PyTorch
reference does). The outputs are then unsorted and summed with the routing weights. Few
assignments (a decode step) skip the sort, as mlx-lm's ``SwitchGLU`` does: ``gather_mm`` takes
the expert ids as they come, and the two argsorts and two gathers of the sort would be most of
the layer's operations.

:class:`SwitchLinear` has mlx-lm's layout and call (``mlx_lm.models.switch_layers``): weight
``[E, out, in]``, ``layer(x, indices, sorted_indices)``. So ``nn.quantize`` (and
``mlx_lm.convert -q``) turns it into mlx-lm's own ``QuantizedSwitchLinear``, which runs
``mx.gather_qmm``. The float class is our own because its weight starts from the reference's
N(0, init_std^2) (mlx-lm's draws a uniform one) and there is no bias.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear as MlxLmSwitchLinear


def gather_sort(x: mx.array, experts: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Sort (row, slot) assignments by expert and gather each assignment's input row.

    ``x`` [N, Din]; ``experts`` [N, ...] expert ids (every entry of row n reads x[n]).
    Returns rows [A, 1, Din] in expert order, their expert ids [A] (sorted) and the inverse
    permutation [A] that restores the row-major order of ``experts``.
    """
    per_row = experts.size // x.shape[0]
    flat = experts.reshape(-1)
    order = mx.argsort(flat)
    inverse = mx.argsort(order)
    return x[order // per_row][:, None, :], flat[order], inverse


# mlx-lm's threshold (SwitchGLU): sorting pays off from 64 assignments.
SORT_THRESHOLD = 64


def switch_apply(x: mx.array, experts: mx.array, weights: mx.array,
                 fn: Callable[[mx.array, mx.array, bool], mx.array]) -> mx.array:
    """``sum_j weights[n, j] * fn(x[n], experts[n, j])`` for every row n of ``x`` [N, Din].

    ``experts`` [N, ...] and ``weights`` [..., S] hold the same assignments (``weights`` may group
    them differently, e.g. [N, H*k] to sum heads and slots at once); ``fn(rows, ids, sorted)``
    maps rows [..., 1, Din] with their expert ids [...] to [..., 1, Dout]: the expert-sorted rows
    [A, 1, Din] with sorted ids [A] (``sorted`` True, from ``SORT_THRESHOLD`` assignments), else
    each row broadcast against its own ids ([N, 1.., 1, Din] with ``experts``).
    """
    if experts.size >= SORT_THRESHOLD:
        rows, ids, inverse = gather_sort(x, experts)
        y = fn(rows, ids, True)[inverse]
    else:
        rows = x.reshape(x.shape[0], *[1] * experts.ndim, x.shape[-1])
        y = fn(rows, experts, False)
    y = y.reshape(*weights.shape, -1)
    return (weights[..., None, :] @ y).squeeze(-2)


# (group size, bits) that mx.quantize uses for each mode when none are given.
_MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


class SwitchLinear(nn.Module):
    """E bias-free linear maps, weight ``[E, out, in]``; row a is multiplied by ``indices[a]``.

    ``init_std`` draws the weight from N(0, init_std^2).
    """

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, init_std: float):
        super().__init__()
        self.weight = mx.random.normal((num_experts, output_dims, input_dims)) * init_std

    @property
    def input_dims(self) -> int:
        return self.weight.shape[2]

    @property
    def output_dims(self) -> int:
        return self.weight.shape[1]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self["weight"].swapaxes(-1, -2), rhs_indices=indices,
                            sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine", global_scale: bool = False, **kwargs) -> nn.Module:
        """mlx-lm's ``QuantizedSwitchLinear`` of this weight (``mx.gather_qmm`` experts)."""
        if kwargs.get("quantize_input"):
            raise ValueError("quantized inputs are not supported for MoE experts")
        default_group_size, default_bits = _MODE_DEFAULTS[mode]
        E, out, inp = self.weight.shape
        layer = MlxLmSwitchLinear(inp, out, E, bias=False)
        layer.weight = self.weight
        return layer.to_quantized(group_size=group_size or default_group_size,
                                  bits=bits or default_bits, mode=mode, global_scale=global_scale)
