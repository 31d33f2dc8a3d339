"""Dense all-experts MoE layers, computed as the PyTorch reference does: test oracles and the
benchmark baseline (E/k times the compute of the gather-based layers in mlx_trm.models.moe)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_trm.models.moe import SigmaMoE, SwitchHead


def sigma_moe_dense(moe: SigmaMoE, x: mx.array, sel: mx.array) -> mx.array:
    """Every expert on every token, then gather the chosen k (weights are [E, out, in])."""
    _, idx, w = moe.route(sel)
    scores = nn.relu(mx.einsum("btd,ehd->bteh", x, moe["keys"].weight))
    values_all = mx.einsum("bteh,evh->btev", scores, moe["values"].weight)
    chosen = mx.take_along_axis(values_all, idx[..., None], axis=2)
    return (chosen * w[..., None]).sum(axis=2)


def _rope_reference(x: mx.array, n_rot: int, theta: float, offset: int) -> mx.array:
    """Table-based NeoX RoPE on the first ``n_rot`` dims, written out as the reference does."""
    T = x.shape[-2]
    inv_freq = 1.0 / (theta ** (mx.arange(0, n_rot, 2, dtype=mx.float32) / n_rot))
    ang = mx.arange(offset, offset + T, dtype=mx.float32)[:, None] * inv_freq[None, :]
    emb = mx.concatenate([ang, ang], axis=-1)
    r, rest = x[..., :n_rot], x[..., n_rot:]
    half = n_rot // 2
    rotated = mx.concatenate([-r[..., half:], r[..., :half]], axis=-1)
    return mx.concatenate([r * mx.cos(emb) + rotated * mx.sin(emb), rest], axis=-1)


def switch_head_dense(sh: SwitchHead, a: mx.array, h: mx.array) -> mx.array:
    """Reference SwitchHead (no cache): all experts via einsum, gathered; table-based RoPE."""
    B, T, D = h.shape
    H, E, P = sh.num_heads, sh.n_experts, sh.head_dim
    (_, idx_v, w_v), (_, idx_o, w_o) = sh.route(a)
    v_all = mx.einsum("btd,hepd->bthep", h, sh.v.weight.reshape(H, E, P, D))
    v = (mx.take_along_axis(v_all, idx_v[..., None], axis=3) * w_v[..., None]).sum(3)
    pre = P ** -0.25
    q = (a @ sh.q.weight.T * pre).reshape(B, T, H, P).transpose(0, 2, 1, 3)
    k = (a @ sh.k.weight.T * pre).reshape(B, T, H, P).transpose(0, 2, 1, 3)
    if sh.n_rot:
        q = _rope_reference(q, sh.n_rot, sh.rope_theta, 0)
        k = _rope_reference(k, sh.n_rot, sh.rope_theta, 0)
    scores = q @ k.transpose(0, 1, 3, 2)
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    att = mx.softmax(mx.where(causal, scores, -mx.inf), axis=-1) @ v.transpose(0, 2, 1, 3)
    o_all = mx.einsum("bhtp,heqp->btheq", att, sh.o.weight.reshape(H, E, D, P))
    out = (mx.take_along_axis(o_all, idx_o[..., None], axis=3) * w_o[..., None]).sum(3)
    return out.sum(2)
