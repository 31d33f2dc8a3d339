"""Token cross-entropy straight from the hidden states, without the [N, V] logits.

With a 10k vocabulary the read-out dominates a small model's memory: at 64 x 512 tokens one
float32 logits tensor is 1.3 GB, and the plain loss keeps the logits, their softmax and the
gradient alive together. Here the rows are processed in chunks: the forward keeps only each
row's log-sum-exp, target logit and arg-max, and the backward recomputes a chunk's logits from
the hidden states, turns them into the gradient and folds it into dh and dW before the next
chunk starts (the idea of "cut cross-entropy" and Liger's fused linear cross-entropy). The
values are the plain path's up to float re-association; the cost is one more [chunk, D] x
[D, V] matmul per chunk in the backward.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .layers import TiedEmbedding, exp

# Rows per chunk. Each chunk's logits are [CHUNK_ROWS, V]: 1024 x 10k float32 is 41 MB, a
# matmul still large enough to run at full speed on Metal. On the CPU, the compiled training
# loss over 64 x 512 rows (10k ids) peaked at 1.98 / 1.00 / 0.51 GB above its inputs with
# chunks of 2048 / 1024 / 512 rows, in 5.27 / 4.75 / 4.96 s: the scheduler keeps a fixed number
# of chunk-sized temporaries alive, so the peak follows the chunk. (In the whole dense TRM step
# 512 rows saved only 0.09 GB more: the backward's own temporaries set the peak there.)
CHUNK_ROWS = 1024
# Up to this size the logits are kept whole and the backward reuses their softmax (no second
# read-out matmul, no second exp): at 8 x 512 tokens and 10k ids they are 164 MB.
KEEP_LOGITS_BYTES = 256 * 2**20


def plan_chunk_rows(rows: int, vocab: int, training: bool = False) -> int:
    """Rows per loss chunk for ``rows`` rows: all of them (one chunk, nothing recomputed) when
    their logits are small, else :data:`CHUNK_ROWS`. A training loss builds its gradient in the
    forward (:func:`weighted_linear_cross_entropy`) and so recomputes nothing in chunks either:
    it always takes them (at 8 x 512 the flat model's step peaked at 1.62 GB with the whole
    logits, their softmax and the exp's temporaries, against 0.98 GB before the CPU exp kernel)."""
    if training:
        return min(rows, CHUNK_ROWS)
    return rows if rows * vocab * 4 <= KEEP_LOGITS_BYTES else CHUNK_ROWS


@mx.custom_function
def _cross_entropy_and_softmax(logits: mx.array, labels: mx.array) -> tuple[mx.array, mx.array]:
    m = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    e = exp(logits - m)
    total = e.sum(axis=-1, keepdims=True)
    logsumexp = (m + mx.log(total))[..., 0]
    target = mx.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return logsumexp - target, e / total


@_cross_entropy_and_softmax.vjp
def _cross_entropy_vjp(primals, cotangents, outputs):
    logits, labels = primals
    onehot = mx.arange(logits.shape[-1]) == labels[..., None]
    return cotangents[0][..., None] * (outputs[1] - onehot), mx.zeros_like(labels)


def cross_entropy(logits: mx.array, labels: mx.array) -> mx.array:
    """Per-token cross-entropy whose backward reuses the forward's softmax.

    Same values as ``nn.losses.cross_entropy``; with a 10k vocabulary the exp over the logits is
    the most expensive elementwise op of a 1M-parameter model's step on the CPU backend, and
    the stock backward recomputes it.
    """
    return _cross_entropy_and_softmax(logits, labels)[0]


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + rows, n)) for lo in range(0, n, rows)]


def _after(x: mx.array, previous: list[mx.array]) -> mx.array:
    """``x``, but evaluated only after ``previous``: keeps one chunk's [rows, V] alive at a time
    (otherwise the scheduler may start every chunk's matmul before the first is reduced)."""
    return mx.depends(x, previous) if previous else x


def _read_out(h: mx.array, weight: mx.array, labels: mx.array) -> tuple[mx.array, ...]:
    """One chunk's logits ``h @ weight.T``, reduced: (exp(logits - row max), its row sums
    [rows, 1], log-sum-exp, cross-entropy against ``labels``, arg-max)."""
    logits = h @ weight.T
    m = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    e = exp(logits - m)
    total = e.sum(axis=-1, keepdims=True)
    lse = (m + mx.log(total))[:, 0]
    target = mx.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return e, total, lse, lse - target, mx.argmax(logits, axis=-1)


def _make_fused(rows: int):
    @mx.custom_function
    def fused(hidden: mx.array, weight: mx.array, labels: mx.array):
        """(per-row CE, log-sum-exp, arg-max) of ``hidden @ weight.T`` against ``labels``."""
        ce, lse, argmax = [], [], []
        for lo, hi in _chunks(hidden.shape[0], rows):
            h = _after(hidden[lo:hi], ce[-1:] + argmax[-1:])
            _, _, chunk_lse, chunk_ce, chunk_argmax = _read_out(h, weight, labels[lo:hi])
            ce.append(chunk_ce)
            lse.append(chunk_lse)
            argmax.append(chunk_argmax)
        return mx.concatenate(ce), mx.concatenate(lse), mx.concatenate(argmax)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        hidden, weight, labels = primals
        d_ce, lse = cotangents[0], outputs[1]
        d_hidden, d_weight = [], None
        vocab = mx.arange(weight.shape[0])
        for lo, hi in _chunks(hidden.shape[0], rows):
            previous = d_hidden[-1:] + ([d_weight] if d_weight is not None else [])
            h = _after(hidden[lo:hi], previous)
            softmax = exp(h @ weight.T - lse[lo:hi, None])
            onehot = vocab == labels[lo:hi, None]
            g = d_ce[lo:hi, None] * (softmax - onehot)
            d_hidden.append(g @ weight)
            d_w = g.T @ h
            d_weight = d_w if d_weight is None else d_weight + d_w
        return mx.concatenate(d_hidden), d_weight, mx.zeros_like(labels)

    return fused


_FUSED: dict[int, Any] = {}


def linear_cross_entropy(hidden: mx.array, weight: mx.array, labels: mx.array,
                         chunk_rows: int = CHUNK_ROWS) -> tuple[mx.array, mx.array]:
    """Per-token cross-entropy and arg-max of the logits ``hidden @ weight.T``.

    ``hidden`` is [..., D], ``weight`` [V, D], ``labels`` [...] (valid ids: mask outside).
    Returns (ce, argmax), both shaped like ``labels``; ce is differentiable in ``hidden`` and
    ``weight``. ``chunk_rows`` bounds the rows whose logits exist at any one time.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    shape = labels.shape
    if chunk_rows not in _FUSED:
        _FUSED[chunk_rows] = _make_fused(chunk_rows)
    ce, _, argmax = _FUSED[chunk_rows](hidden.reshape(-1, hidden.shape[-1]), weight,
                                       labels.reshape(-1))
    return ce.reshape(shape), argmax.reshape(shape)


def weighted_linear_cross_entropy(hidden: mx.array, weight: mx.array, labels: mx.array,
                                  row_weight: mx.array, chunk_rows: int = CHUNK_ROWS
                                  ) -> tuple[mx.array, mx.array, mx.array]:
    """``sum(row_weight * ce)`` of the logits ``hidden @ weight.T``, with its gradient computed
    in the same pass (the training loss; Liger's fused linear cross-entropy).

    A weighted sum's gradient is known before the backward starts: d/dlogits = row_weight *
    (softmax - onehot). Each chunk's exp then serves both the log-sum-exp and the gradient, and
    its dh and dW contributions are folded in before the next chunk starts: one exp and three
    matmuls per logit instead of :func:`linear_cross_entropy`'s two and four. The result carries
    the gradient through ``sum(hidden * dh) + sum(weight * dW)``, which adds exactly zero to its
    value. ``row_weight`` (shaped like ``labels``) is data and gets no gradient. Returns (loss,
    ce, argmax); ce and argmax are not differentiable.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    flat_h = mx.stop_gradient(hidden.reshape(-1, hidden.shape[-1]))
    w, y = mx.stop_gradient(weight), labels.reshape(-1)
    row_w = mx.stop_gradient(row_weight.reshape(-1, 1).astype(mx.float32))
    vocab = mx.arange(w.shape[0])
    ce, argmax, d_hidden, d_weight = [], [], [], mx.zeros_like(w)
    for lo, hi in _chunks(flat_h.shape[0], chunk_rows):
        h = _after(flat_h[lo:hi], ce[-1:] + argmax[-1:] + d_hidden[-1:] + [d_weight])
        e, total, _, chunk_ce, chunk_argmax = _read_out(h, w, y[lo:hi])
        ce.append(chunk_ce)
        argmax.append(chunk_argmax)
        g = row_w[lo:hi] * (e / total - (vocab == y[lo:hi, None]))
        d_hidden.append(g @ w)
        d_weight = d_weight + g.T @ h
    ce, d_hidden = mx.concatenate(ce), mx.concatenate(d_hidden).reshape(hidden.shape)
    loss = (row_w[:, 0] * ce).sum()
    surrogate = (hidden * d_hidden).sum() + (weight * d_weight).sum()
    loss = loss + (surrogate - mx.stop_gradient(surrogate))
    return loss, ce.reshape(labels.shape), mx.concatenate(argmax).reshape(labels.shape)


def chunked_cross_entropy(hidden: mx.array, head: Any, labels: mx.array,
                          chunk_rows: int = CHUNK_ROWS) -> tuple[mx.array, mx.array]:
    """The same through any read-out ``head`` with ``as_linear`` (a quantized embedding):
    chunked forward, and the backward keeps each chunk's logits (no weight gradient needed)."""
    flat, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    ce, argmax = [], []
    for lo, hi in _chunks(flat.shape[0], chunk_rows):
        logits = head.as_linear(flat[lo:hi]).astype(mx.float32)
        lse = mx.logsumexp(logits, axis=-1)
        ce.append(lse - mx.take_along_axis(logits, y[lo:hi, None], axis=-1)[..., 0])
        argmax.append(mx.argmax(logits, axis=-1))
    return mx.concatenate(ce).reshape(labels.shape), mx.concatenate(argmax).reshape(labels.shape)


def token_cross_entropy(outputs: dict[str, Any], labels: mx.array, row_weight: mx.array,
                        chunk_rows: int | None = None, training: bool = False
                        ) -> tuple[mx.array, mx.array, mx.array]:
    """(sum(row_weight * ce), per-token cross-entropy, arg-max prediction) of an ACT step.

    From ``hidden`` and ``head`` (what ``act_step`` returns) in chunks of ``chunk_rows``
    rows (default: ``plan_chunk_rows``), so large [B, T, V] logits never exist; from the whole
    logits when one chunk holds every row, or when only ``logits`` are given. ``training``
    computes a chunked read-out's gradient in the forward pass
    (:func:`weighted_linear_cross_entropy`): differentiate the weighted sum, not the per-token ce.
    """
    if "hidden" in outputs:
        hidden, head = outputs["hidden"].astype(mx.float32), outputs["head"]
        weight = getattr(head, "embedding_weight", None)
        plain_weight = (isinstance(head, TiedEmbedding) and isinstance(weight, mx.array)
                        and mx.issubdtype(weight.dtype, mx.floating))
        vocab = weight.shape[0] if plain_weight else head.as_linear(hidden[:1, :1]).shape[-1]
        rows = labels.size
        chunk = chunk_rows or plan_chunk_rows(rows, vocab, training)
        if chunk < rows and plain_weight and training:
            return weighted_linear_cross_entropy(hidden, weight, labels, row_weight, chunk)
        if chunk < rows and plain_weight:
            ce, predicted = linear_cross_entropy(hidden, weight, labels, chunk)
        elif chunk < rows:  # another read-out (e.g. a quantized embedding): no weight gradient
            ce, predicted = chunked_cross_entropy(hidden, head, labels, chunk)
        else:
            outputs = {"logits": head.as_linear(hidden)}
    if "logits" in outputs:
        logits = outputs["logits"].astype(mx.float32)
        ce, predicted = cross_entropy(logits, labels), mx.argmax(logits, axis=-1)
    return (ce * row_weight).sum(), ce, predicted
