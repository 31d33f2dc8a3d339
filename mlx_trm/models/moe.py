"""MoEUT sparse layers: sigma-MoE feed-forward experts and SwitchHead attention experts.

Each layer is a :class:`~.router.Router` (which experts, with which weights) plus expert weights
run by :func:`~.switch_layers.switch_apply` (sort the assignments by expert, one gather_mm per
matrix, unsort and sum; few assignments skip the sort). In a training forward the layers add
their router calls to a :class:`~.router.RoutingLog` (``record``), from which the step takes the
entropy regulariser and the expert counts for the bias update.

Parameter names differ from the PyTorch reference's: the experts are ``SwitchLinear`` modules
(``keys.weight`` [E, out, in], mlx-lm's layout, so that they quantize) and the routers own their
buffers (``router.bias`` for the reference's ``expert_bias``). :data:`REFERENCE_NAMES` is the
mapping; :func:`from_reference_names` reads reference-named (and older mlx-trm) weights.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .layers import attention, rope, rope_frequencies
from .router import Router, RoutingLog
from .switch_layers import SwitchLinear, switch_apply


def _balancing(bias_balancing: bool, bias_update_rate: float, bias_momentum: float,
               bias_clip: float | None, entropy_coef: float) -> dict[str, Any]:
    return dict(bias_balancing=bias_balancing, bias_update_rate=bias_update_rate,
                bias_momentum=bias_momentum, bias_clip=bias_clip, entropy_coef=entropy_coef)


class SigmaMoE(nn.Module):
    """sigma-MoE FFN: E experts of width ``expert_size``, top-k sigmoid routing.

    ``y = sum_j w_j * relu(x K[e_j]) V[e_j]`` where the experts e_j are chosen from ``sel`` (the
    normalised residual) and ``x`` is the un-normalised residual. Init (plain normal): selector
    and keys std ``init_scale / sqrt(D)``, values ``init_scale / sqrt(E * expert_size)``.
    """

    def __init__(self, hidden_size: int, n_experts: int, expert_size: int, k: int, *,
                 init_scale: float, bias_balancing: bool = True, bias_update_rate: float = 1e-3,
                 bias_momentum: float = 0.9, bias_clip: float | None = 1.0,
                 entropy_coef: float = 0.01):
        super().__init__()
        D, E, es = hidden_size, n_experts, expert_size
        self.hidden_size, self.n_experts, self.expert_size, self.top_k = D, E, es, k
        self.router = Router(D, E, k, init_std=init_scale / math.sqrt(D), **_balancing(
            bias_balancing, bias_update_rate, bias_momentum, bias_clip, entropy_coef))
        # Item access: Module is a dict, so the attributes ``keys``/``values`` are dict methods.
        self["keys"] = SwitchLinear(D, es, E, init_std=init_scale / math.sqrt(D))
        self["values"] = SwitchLinear(es, D, E, init_std=init_scale / math.sqrt(E * es))
        self.route_scale = mx.ones((1,))

    def route(self, sel: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Router logits [..., E] (fp32), chosen experts [..., k] and their weights [..., k]."""
        return self.router(sel, self.route_scale)

    def __call__(self, x: mx.array, sel: mx.array, record: RoutingLog | None = None) -> mx.array:
        logits, idx, w = self.route(sel)
        if record is not None:
            record.add(self.router, logits, idx)
        keys, values = self["keys"], self["values"]

        def expert(rows: mx.array, ids: mx.array, sort: bool) -> mx.array:
            hidden = nn.relu(keys(rows, ids, sorted_indices=sort))
            return values(hidden, ids, sorted_indices=sort)

        D, k = x.shape[-1], self.top_k
        y = switch_apply(x.reshape(-1, D), idx.reshape(-1, k), w.reshape(-1, k), expert)
        return y.reshape(x.shape)


class SwitchHead(nn.Module):
    """SwitchHead attention with partial RoPE: dense q/k, expert-mixed v and o per head.

    Each head picks k of its own E value experts (``v_router``) and k of its E output experts
    (``o_router``); expert ``e`` of head ``h`` is row ``h * E + e`` of ``v`` / ``o``. Init:
    selectors, q, k, v ~ N(0, (init_scale/sqrt(D))^2), o with ``sqrt(H * head_dim)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, n_experts: int, k: int, *,
                 init_scale: float, rope_theta: float = 10000.0, bias_balancing: bool = True,
                 bias_update_rate: float = 1e-3, bias_momentum: float = 0.9,
                 bias_clip: float | None = 1.0, entropy_coef: float = 0.001):
        super().__init__()
        if n_experts < 2:
            raise ValueError("SwitchHead needs n_experts >= 2 (the gated E=1 form is not ported)")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        D, H, E = hidden_size, num_heads, n_experts
        P = D // H
        self.hidden_size, self.num_heads, self.head_dim = D, H, P
        self.n_experts, self.top_k = E, k
        # RoPE on the first half of each head (made even); 0 means no rotation at all.
        n_rot = int(0.5 * P)
        n_rot -= n_rot % 2
        self.n_rot = n_rot if n_rot >= 2 else 0
        self.rope_theta = rope_theta
        self._freqs = rope_frequencies(self.n_rot, rope_theta) if self.n_rot else None

        std = init_scale / math.sqrt(D)
        # The reference pre-multiplies the bias rate by sqrt(E) (E per head).
        balancing = _balancing(bias_balancing, bias_update_rate * math.sqrt(E), bias_momentum,
                               bias_clip, entropy_coef)
        self.v_router = Router(D, E, k, init_std=std, groups=H, **balancing)
        self.o_router = Router(D, E, k, init_std=std, groups=H, **balancing)
        self.q = nn.Linear(D, H * P, bias=False)
        self.k = nn.Linear(D, H * P, bias=False)
        self.k.weight = mx.random.normal((H * P, D)) * std
        self.q.weight = mx.random.normal((H * P, D)) * std
        self.v = SwitchLinear(D, P, H * E, init_std=std)
        self.o = SwitchLinear(P, D, H * E, init_std=init_scale / math.sqrt(H * P))
        self.route_scale = mx.ones((1,))

    def route(self, a: mx.array) -> tuple[tuple[mx.array, mx.array, mx.array], ...]:
        """(logits [B,T,H,E], local indices [B,T,H,k], weights [B,T,H,k]) for v and for o."""
        return self.v_router(a, self.route_scale), self.o_router(a, self.route_scale)

    def qk(self, a: mx.array, cache: Any = None) -> tuple[mx.array, mx.array]:
        """q, k as [B, H, T, P], pre-scaled by P^-1/4 each (SDPA then runs with scale 1), RoPE at
        the positions of ``cache``'s new tokens (from 0 without one)."""
        B, T, _ = a.shape
        pre = self.head_dim ** -0.25
        q = (self.q(a) * pre).reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = (self.k(a) * pre).reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)
        if self.n_rot:
            q = rope(q, self._freqs, cache, self.n_rot)
            k = rope(k, self._freqs, cache, self.n_rot)
        return q, k

    def __call__(self, a: mx.array, h: mx.array, cache: Any = None,
                 record: RoutingLog | None = None) -> mx.array:
        """``a = rms_norm(h)`` feeds q, k and both routers; ``h`` (un-normalised) feeds v.

        ``cache`` is one KV slot with the contract of ``layers.attention`` (``offset``,
        ``make_mask``, ``update_and_fetch``); it stores k after RoPE and the expert-mixed v.
        """
        B, T, D = h.shape
        H, P, k = self.num_heads, self.head_dim, self.top_k
        (lv, idx_v, w_v), (lo, idx_o, w_o) = self.route(a)
        if record is not None:
            record.add(self.v_router, lv, idx_v)
            record.add(self.o_router, lo, idx_o)

        # v[b, t, h] = sum_j w_v * h[b, t] @ V[h*E + e_j]: one assignment per (token, head, slot).
        experts_v = self.v_router.expert_ids(idx_v).reshape(-1, H, k)
        v = switch_apply(h.reshape(-1, D), experts_v, w_v.reshape(-1, H, k),
                         lambda rows, ids, sort: self.v(rows, ids, sorted_indices=sort))
        v = v.reshape(B, T, H, P).transpose(0, 2, 1, 3)

        q, kk = self.qk(a, cache)
        att = attention(q, kk, v, scale=1.0, cache=cache)  # [B, H, T, P]

        # out[b, t] = sum_h sum_j w_o * att[b, t, h] @ O[h*E + e_j]; heads and slots summed at once.
        att = att.transpose(0, 2, 1, 3).reshape(-1, P)
        experts_o = self.o_router.expert_ids(idx_o).reshape(-1, k)
        out = switch_apply(att, experts_o, w_o.reshape(-1, H * k),
                           lambda rows, ids, sort: self.o(rows, ids, sorted_indices=sort))
        return out.reshape(B, T, D)


# --------------------------------------------------------------------------------------------
# Reference parameter names


def _reference_names() -> dict[str, tuple[str, bool]]:
    """Reference leaf name -> (our name relative to the layer, stored transposed?)."""
    names = {"keys": ("keys.weight", True), "values": ("values.weight", True),
             "expert_sel": ("router.weight", False),
             "selector_target_std": ("router.target_std", False),
             "v": ("v.weight", True), "o": ("o.weight", True)}
    for buffer in ("bias", "token_count", "running_load"):
        names[f"expert_{buffer}"] = (f"router.{buffer}", False)
        for r in ("v", "o"):
            names[f"expert_{r}_{buffer}"] = (f"{r}_router.{buffer}", False)
    for r in ("v", "o"):
        names[f"sel_{r}"] = (f"{r}_router.weight", False)
        names[f"sel_{r}_target_std"] = (f"{r}_router.target_std", False)
    return names


# The reference stores the experts [E, in, out] and the routers' arrays on the layer itself.
REFERENCE_NAMES = _reference_names()
_OURS = {ours: (ref, t) for ref, (ours, t) in REFERENCE_NAMES.items()}


def from_reference_names(weights: dict[str, Any]) -> dict[str, Any]:
    """Weights named as the reference (or by mlx-trm before the router modules) -> ours.

    Keys already in our naming pass through, so this is safe on any weights.
    """
    out = {}
    for key, value in weights.items():
        parent, _, leaf = key.rpartition(".")
        if leaf in REFERENCE_NAMES:
            ours, transposed = REFERENCE_NAMES[leaf]
            key = f"{parent}.{ours}" if parent else ours
            value = value.swapaxes(-1, -2) if transposed else value
        out[key] = value
    return out


def to_reference_names(weights: dict[str, Any]) -> dict[str, Any]:
    """Our MoE weight names -> the reference's (the inverse of :func:`from_reference_names`)."""
    out = {}
    for key, value in weights.items():
        parts = key.split(".")
        tail = ".".join(parts[-2:])
        if len(parts) >= 2 and tail in _OURS:
            ref, transposed = _OURS[tail]
            key = ".".join(parts[:-2] + [ref])
            value = value.swapaxes(-1, -2) if transposed else value
        out[key] = value
    return out
