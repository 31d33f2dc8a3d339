"""Building blocks shared by every variant: rms_norm, RoPE, causal attention, SwiGLU, init, and
the exp that every softmax and SiLU of the model goes through.

Names of modules and parameters follow the PyTorch reference (``qkv_proj``, ``gate_up_proj``,
``embedding_weight``) so a state dict converts key for key.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from ..kernels import metal_kernels

# std of a standard normal truncated to [-2, 2]; dividing by it makes the truncated draw have
# exactly the requested std (the reference's JAX-style trunc_normal_init_).
TRUNC_NORMAL_STD = 0.87962566103423978


def trunc_normal(shape: tuple[int, ...], std: float) -> mx.array:
    """Truncated normal at +-2 "raw" sigma, rescaled so the result's std is exactly ``std``."""
    if std == 0:
        return mx.zeros(shape)
    return mx.random.truncated_normal(-2.0, 2.0, shape) * (std / TRUNC_NORMAL_STD)


LOG2E = 1.4426950408889634


def exp_is_scalar() -> bool:
    """True on MLX's CPU backend off macOS, where ``mx.exp`` runs one element at a time.

    Measured on a 2-core x86 Linux box (82M float32 values, compiled): ``mx.exp`` 42 M/s,
    ``mx.power(2, x * log2(e))`` 161 M/s, the same 1e-6 worst relative error. With a 10k
    vocabulary and 64 x 512 tokens, the read-out's softmax alone is 327M exps a step, and
    attention and SiLU add as many again. On Metal (and Apple's vectorised CPU kernels) exp is
    the fast op and stays. ``MLX_TRM_KERNELS`` picks either on any device (mlx_trm/kernels.py).
    """
    return not metal_kernels(apple_cpu=True)


def exp(x: mx.array) -> mx.array:
    """``mx.exp``, or the same as a power of two where that is faster (:func:`exp_is_scalar`).

    A polynomial exp built from the float's exponent bits ran 1.7x faster than the power on its
    own, but inside a differentiated, compiled graph its bit views split the fused kernel: over
    [4096, 10000] values it took 1.58 s and 1.31 GB against the power's 1.16 s and 0.66 GB, and
    it added 0.49 GB to every model's training step at 8 x 512.
    """
    return mx.power(2.0, x * LOG2E) if exp_is_scalar() else mx.exp(x)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis through :func:`exp`. Each row needs one finite entry (a
    causal row has its diagonal)."""
    if not exp_is_scalar():
        return mx.softmax(x, axis=-1)
    e = exp(x - mx.stop_gradient(mx.max(x, axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


@mx.custom_function
def _silu_and_sigmoid(x: mx.array) -> tuple[mx.array, mx.array]:
    s = 1 / (1 + exp(-x))
    return x * s, s


@_silu_and_sigmoid.vjp
def _silu_vjp(primals, cotangents, outputs):
    x, s = primals, outputs[1]  # one input: MLX passes it bare
    return cotangents[0] * s * (1 + x * (1 - s))


# Below this many values an op's overhead outweighs the exp: a decode step's SiLU rows stay on
# nn.silu (through the custom function, cached flat decoding measured ~20% slower).
SMALL = 1 << 16


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) through :func:`exp` (``nn.silu`` where exp is fast, or ``x`` is small).
    Like ``nn.silu``'s autodiff, the backward keeps x and the sigmoid, and computes no exp."""
    return _silu_and_sigmoid(x)[0] if exp_is_scalar() and x.size >= SMALL else nn.silu(x)


@mx.custom_function
def _attention_and_weights(q: mx.array, k: mx.array, v: mx.array, bias: mx.array
                           ) -> tuple[mx.array, mx.array]:
    weights = softmax(q @ k.swapaxes(-1, -2) + bias)
    return weights @ v, weights


@_attention_and_weights.vjp
def _attention_vjp(primals, cotangents, outputs):
    (q, k, v, bias), d_out, weights = primals, cotangents[0], outputs[1]
    d_weights = d_out @ v.swapaxes(-1, -2)
    d_scores = weights * (d_weights - (d_weights * weights).sum(axis=-1, keepdims=True))
    return (d_scores @ k, d_scores.swapaxes(-1, -2) @ q, weights.swapaxes(-1, -2) @ d_out,
            mx.zeros_like(bias))


# Causal attention runs in blocks of this many queries, each over the keys it can see: at 512
# positions 62.5% of the full score matrix (fewer exps, a smaller backward).
QUERY_BLOCK = 128


def masked_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                     mask: mx.array | str) -> mx.array:
    """softmax(q k^T * scale, where ``mask``) v through :func:`exp`: q [B, H, T, Dh], k and v
    [B, H, S, Dh], ``mask`` a boolean array broadcast to [B, H, T, S] or ``"causal"`` (q the
    last T of the S positions).

    Where exp is slow this replaces ``mx.fast.scaled_dot_product_attention``, whose CPU
    fallback computes the same softmax with ``mx.exp``. The backward keeps only the attention
    weights and computes no exp. The mask is an additive 0 / -inf bias (``mx.where`` over the
    scores costs as much as an exp here).
    """
    q = q * scale
    if not isinstance(mask, str):
        bias = mx.where(mask, 0.0, -mx.inf).astype(q.dtype)
        return _attention_and_weights(q, k, v, bias)[0]
    T, S = q.shape[2], k.shape[2]
    outs = []
    for lo in range(0, T, QUERY_BLOCK):
        hi = min(lo + QUERY_BLOCK, T)
        end = hi + S - T  # the queries lo..hi-1 see keys 0..end-1
        seen = mx.arange(lo + S - T, end)[:, None] >= mx.arange(end)[None]
        bias = mx.where(seen, 0.0, -mx.inf).astype(q.dtype)
        outs.append(_attention_and_weights(q[:, :, lo:hi], k[:, :, :end], v[:, :, :end], bias)[0])
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def rms_norm(x: mx.array, eps: float = 1e-5) -> mx.array:
    """RMS norm without a learnable gain, as the reference: x * rsqrt(mean(x^2) + eps).

    On the GPU ``mx.fast.rms_norm`` computes the same (in float32) as one kernel instead of
    three, which counts at 112 norms per decode step; on the CPU it is no faster than this
    formula, so the CPU keeps the reference's form.
    """
    if metal_kernels():
        return mx.fast.rms_norm(x, None, eps)
    return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)


def rope_frequencies(dims: int, theta: float) -> mx.array:
    """Wavelength-style frequencies for ``mx.fast.rope(freqs=...)``.

    The reference builds ``inv_freq = 1 / theta ** (arange(0, dims, 2) / dims)`` and rotates in the
    NeoX rotate-half layout; ``mx.fast.rope`` computes the angle as position / freqs, so passing
    ``1 / inv_freq`` reproduces the reference table (to ~5e-7) at any position, with no fixed
    512-entry table.
    """
    inv_freq = 1.0 / (theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
    return 1.0 / inv_freq


def apply_rope(x: mx.array, freqs: mx.array, offset: int | mx.array,
               dims: int | None = None) -> mx.array:
    """NeoX-layout RoPE on ``x`` [B, H, T, Dh] at positions offset..offset+T-1 (first ``dims``).

    ``offset`` is an int, or an int32 array [B] of per-row positions (a left-padded batch cache:
    mlx-lm's ``BatchKVCache.offset``); ``mx.fast.rope`` takes either."""
    dims = x.shape[-1] if dims is None else dims
    return mx.fast.rope(x, dims, traditional=False, base=None, scale=1.0, offset=offset,
                        freqs=freqs)


def rope(x: mx.array, freqs: mx.array, cache: Any = None, dims: int | None = None) -> mx.array:
    """RoPE of the first ``dims`` of ``x`` [B, H, T, Dh] at the positions of ``cache``'s new
    tokens (0.. without one).

    A fixed-capacity cache rotates with a cos/sin table it computes once per forward for every
    layer application (generation/cache.py): a decode step is dominated by per-operation
    overhead, and on the CPU ``mx.fast.rope`` expands into ~12 operations. On Apple silicon
    ``mx.fast.rope`` is one kernel, as the table's rotation of all of Dh is (one fused
    elementwise kernel); a partial rotation (SwitchHead's) would add a copy and a concatenation
    to the table's, so there it stays with ``mx.fast.rope``.
    """
    partial = dims is not None and dims < x.shape[-1]
    if hasattr(cache, "rope") and not (partial and metal_kernels()):
        return cache.rope(x, freqs, dims)
    return apply_rope(x, freqs, 0 if cache is None else cache.offset, dims)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, cache: Any = None) -> mx.array:
    """Causal softmax attention over [B, H, T, Dh] tensors, appending k/v to ``cache`` if given.

    One contract serves mlx-lm's caches (``KVCache``, the left-padded ``BatchKVCache`` of its
    batched generation, ``QuantizedKVCache``) and the compiled decoder's fixed-capacity slots
    (generation/cache.py): the cache decides the mask (``cache.make_mask(T, ...)``: ``"causal"``,
    None for one query, or a boolean array hiding left padding and unwritten columns) and mlx-lm's
    ``scaled_dot_product_attention`` runs the quantized kernel when the cache holds quantized
    keys and values (``--kv-bits``).
    """
    T = q.shape[2]
    mask = "causal" if T > 1 else None
    if cache is not None:
        mask = cache.make_mask(T, return_array=False, window_size=None)
        k, v = cache.update_and_fetch(k, v)
        if hasattr(cache, "bits"):
            return scaled_dot_product_attention(q, k, v, cache, scale=scale, mask=mask)
    # One query (a decode step) is dominated by per-operation overhead: the fused kernel's few
    # operations beat the composed path there (cached flat decoding fell to 501 tok/s through
    # it, from 668-934).
    if mask is not None and T > 1 and exp_is_scalar():
        return masked_attention(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class Attention(nn.Module):
    """Dense causal multi-head attention: fused qkv projection, RoPE on q and k, no biases."""

    def __init__(self, hidden_size: int, num_heads: int, rope_theta: float = 10000.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.qkv_proj.weight = trunc_normal(self.qkv_proj.weight.shape, 1 / math.sqrt(hidden_size))
        self.o_proj.weight = trunc_normal(self.o_proj.weight.shape, 1 / math.sqrt(hidden_size))
        self._freqs = rope_frequencies(self.head_dim, rope_theta)

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        """``x`` is [B, T, D], or [B, D] rows of one position each (cached decoding)."""
        B, T = (x.shape[0], 1) if x.ndim == 2 else x.shape[:2]
        H, Dh = self.num_heads, self.head_dim
        # [B, T, 3H, Dh] -> [B, 3H, T, Dh]; heads 0..H-1 are q, H..2H-1 k, 2H..3H-1 v.
        # One position (decode) needs no transpose: the two layouts share memory.
        qkv = self.qkv_proj(x)
        if T == 1:
            qkv = qkv.reshape(B, 3 * H, 1, Dh)
        else:
            qkv = qkv.reshape(B, T, 3 * H, Dh).transpose(0, 2, 1, 3)
        qk, v = mx.split(qkv, [2 * H], axis=1)
        q, k = mx.split(rope(qk, self._freqs, cache), 2, axis=1)  # q and k rotated in one call
        out = attention(q, k, v, scale=1 / math.sqrt(Dh), cache=cache)
        if T == 1:
            return self.o_proj(out.reshape(*x.shape[:-1], H * Dh))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


def swiglu_intermediate_size(hidden_size: int, expansion: float) -> int:
    """The reference's width: round(expansion * D * 2/3) rounded up to a multiple of 256."""
    return 256 * math.ceil(round(expansion * hidden_size * 2 / 3) / 256)


class SwiGLU(nn.Module):
    """silu(gate) * up, then down; gate is the first half of the fused gate_up projection."""

    def __init__(self, hidden_size: int, expansion: float):
        super().__init__()
        inter = swiglu_intermediate_size(hidden_size, expansion)
        self.gate_up_proj = nn.Linear(hidden_size, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden_size, bias=False)
        std = 1 / math.sqrt(hidden_size)
        self.gate_up_proj.weight = trunc_normal((2 * inter, hidden_size), std)
        self.down_proj.weight = trunc_normal((hidden_size, inter), 1 / math.sqrt(inter))

    def __call__(self, x: mx.array) -> mx.array:
        gate_up, down = self.gate_up_proj, self.down_proj
        plain = type(gate_up) is nn.Linear and type(down) is nn.Linear
        if plain and x.size // x.shape[-1] * down.weight.shape[1] >= SMALL:
            return _swiglu(x, gate_up.weight, down.weight)[0]
        gate, up = mx.split(gate_up(x), 2, axis=-1)  # quantized, or a decode step's few rows
        return down(silu(gate) * up)


def sigmoid(x: mx.array) -> mx.array:
    """``mx.sigmoid`` through :func:`exp`."""
    return 1 / (1 + exp(-x)) if exp_is_scalar() else mx.sigmoid(x)


@mx.custom_function
def _swiglu(x: mx.array, w_gate_up: mx.array, w_down: mx.array) -> tuple[mx.array, mx.array]:
    gate, up = mx.split(x @ w_gate_up.T, 2, axis=-1)
    s = sigmoid(gate)
    return (gate * s * up) @ w_down.T, s


# The SwiGLU backward runs over this many rows at a time: its ~9 [rows, inter] temporaries
# then take ~0.3 GB instead of ~1.2 GB at 64 x 512 in the 1M dense TRM.
BACKWARD_ROWS = 8192


@_swiglu.vjp
def _swiglu_vjp(primals, cotangents, outputs):
    """The backward keeps only the input and the sigmoid (one [.., inter] array instead of the
    four autodiff keeps: gate, up, sigmoid, their product): the gate/up projection is
    recomputed, a matmul, which is cheap next to an exp. At 64 x 512 in the 1M dense TRM that is
    134 MB per layer application instead of 537 MB."""
    (x, w_gate_up, w_down), dy, s = primals, cotangents[0], outputs[1]
    # Recompute only once dy exists (else MLX may run it in the forward and keep it alive), and
    # as its own node (else mx.compile merges it with the forward's identical matmul).
    x, w_gate_up = mx.depends([x, w_gate_up], [dy])
    rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    x, dy, s = rows(x), rows(dy), rows(s)
    w_gate, w_up = mx.split(w_gate_up, 2)
    d_x, d_w_gate, d_w_up, d_w_down = [], 0.0, 0.0, 0.0
    for lo in range(0, x.shape[0], BACKWARD_ROWS):
        xc, dyc, sc = x[lo:lo + BACKWARD_ROWS], dy[lo:lo + BACKWARD_ROWS], s[lo:lo + BACKWARD_ROWS]
        gate, up = xc @ w_gate.T, xc @ w_up.T
        act = gate * sc
        d_act_up = dyc @ w_down
        d_gate = d_act_up * up * sc * (1 + gate * (1 - sc))
        d_up = d_act_up * act
        d_w_gate, d_w_up = d_w_gate + d_gate.T @ xc, d_w_up + d_up.T @ xc
        d_w_down = d_w_down + dyc.T @ (act * up)
        # Hand a chunk's dx on only after its weight gradients: the weights are shared by
        # every chunk and layer application, and MLX would otherwise run the rest of the
        # backward first and keep this chunk's temporaries alive.
        d_x.append(mx.depends(d_gate @ w_gate + d_up @ w_up, [d_w_gate, d_w_up, d_w_down]))
    d_x = d_x[0] if len(d_x) == 1 else mx.concatenate(d_x)
    return (d_x.reshape(primals[0].shape), mx.concatenate([d_w_gate, d_w_up]), d_w_down)


class TiedEmbedding(nn.Module):
    """Token embedding whose weight is also the output head (one parameter, one gradient).

    The parameter keeps the reference's name (``embedding_weight``); ``weight`` is the same array
    under mlx's name, which ``nn.quantize`` and mlx-lm's quantization read. Quantized, the module
    becomes an ``nn.QuantizedEmbedding``: the lookup dequantizes the gathered rows and
    ``as_linear`` (the read-out) runs ``mx.quantized_matmul`` on the packed table.
    """

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.embedding_weight = trunc_normal((vocab_size, hidden_size), 1 / math.sqrt(hidden_size))

    @property
    def weight(self) -> mx.array:
        return self.embedding_weight

    def __call__(self, ids: mx.array) -> mx.array:
        return self.embedding_weight[ids]

    def as_linear(self, h: mx.array) -> mx.array:
        return h @ self.embedding_weight.T

    def to_quantized(self, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine", quantize_input: bool = False) -> nn.QuantizedEmbedding:
        if quantize_input:
            raise ValueError("quantized inputs are not supported for the embedding")
        return nn.QuantizedEmbedding.from_embedding(self, group_size, bits, mode)
