"""MoEUT sparse layers: sigma-MoE feed-forward experts and SwitchHead attention experts.

Experts run gather-based: the ``[N, k]`` (token, slot) choices are flattened and sorted by expert,
each assignment's input row is gathered once, and ``mx.gather_mm(..., sorted_indices=True)``
multiplies every row with its expert's matrix. That costs k/E of the dense all-experts compute the
PyTorch reference does (seed-reference.md §5, §6). The dense paths at the bottom of this file are
test oracles and benchmark baselines only.

Training mechanics (entropy regulariser, expert-bias balancing, selector renorm) are plain functions
over a *record*: a Python list the training code passes to every MoE call; each call appends

    (module, router, logits, indices)

with ``router`` "ff" (SigmaMoE: logits [B, T, E], indices [B, T, k]) or "v" / "o" (SwitchHead:
logits [B, T, H, E], indices [B, T, H, k] holding *per-head local* expert ids 0..E-1; the global id
used for the ``v``/``o`` tensors and the [H*E] buffers is ``h * E + e``). All of it is free of host
syncs, so it traces into ``mx.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .layers import apply_rope, attention, rope_frequencies

Record = list[tuple[nn.Module, str, mx.array, mx.array]]


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _renorm_rows(w: mx.array, target_std: mx.array) -> mx.array:
    """Rows to unit L2 norm, then the whole matrix rescaled to ``target_std`` (unbiased std).

    Matches the reference's ``renorm_keep_std``/``renorm_rows`` (torch.std uses N-1, clamps 1e-12).
    """
    w = w / mx.maximum(mx.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    return w * (target_std / mx.maximum(mx.std(w, ddof=1), 1e-12))


def _init_selector(shape: tuple[int, int], std: float) -> tuple[mx.array, mx.array]:
    """N(0, std^2) selector, renormalised rows; the target std is the *sampled* std (stored)."""
    w = mx.random.normal(shape) * std
    target = mx.maximum(mx.std(w, ddof=1), 1e-12)
    return _renorm_rows(w, target), target


def _topk_indices(scores: mx.array, k: int) -> mx.array:
    """Indices of the k largest ``scores`` along the last axis, in no particular order.

    For the small k MoE uses, k argmax passes are several times faster than ``argpartition`` on
    the MLX CPU backend (E=192: 2.7 ms vs 9.9 ms for 4k tokens).
    """
    if k > 4:
        return mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
    picks = []
    for j in range(k):
        pick = mx.argmax(scores, axis=-1, keepdims=True)
        picks.append(pick)
        if j + 1 < k:
            scores = mx.put_along_axis(scores, pick, mx.array(-mx.inf, scores.dtype), axis=-1)
    return mx.concatenate(picks, axis=-1)


def _route(logits: mx.array, bias: mx.array | None, k: int,
           route_scale: mx.array) -> tuple[mx.array, mx.array]:
    """Top-k experts on ``sigmoid(logits + bias)``; weights from the *unbiased* sigmoid.

    The bias only decides which experts fire (loss-free balancing); weights are normalised over the
    k choices and scaled by ``route_scale``. sigmoid is monotonic, so the top-k runs on
    ``logits + bias`` directly and sigmoid is evaluated only at the k chosen experts: on the CPU
    backend the [N, E] sigmoid was the single most expensive op of the layer. (Only exact fp32
    ties of the saturated sigmoid, which torch breaks arbitrarily, can choose differently.) The
    order of the k choices is arbitrary, as torch's ``topk(sorted=False)``; consumers sum over it.
    """
    scores = logits if bias is None else logits + bias
    # Indices must not carry gradient: gathers with them would fail in the VJP.
    idx = mx.stop_gradient(_topk_indices(mx.stop_gradient(scores), k))
    w = mx.sigmoid(mx.take_along_axis(logits, idx, axis=-1))
    w = w / mx.maximum(w.sum(axis=-1, keepdims=True), 1e-9) * route_scale
    return idx, w


def _dispatch(x: mx.array, experts: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Sort (row, slot) assignments by expert and gather each assignment's input row.

    ``x`` [N, Din]; ``experts`` [N, ...] global expert ids (every entry of row n reads x[n]).
    Returns rows [A, 1, Din] in expert order, their expert ids [A] (sorted) and the inverse
    permutation [A] that restores the row-major order of ``experts``.
    """
    per_row = experts.size // x.shape[0]
    flat = experts.reshape(-1)
    order = mx.argsort(flat)
    inverse = mx.argsort(order)
    rows = x[order // per_row][:, None, :]
    return rows, flat[order], inverse


def _combine(y_sorted: mx.array, inverse: mx.array, weights: mx.array) -> mx.array:
    """Unsort expert outputs [A, 1, Dout] and sum them with ``weights`` [..., S] -> [..., Dout]."""
    y = y_sorted[inverse].reshape(*weights.shape, -1)
    return (weights[..., None, :] @ y).squeeze(-2)


def _expert_mm(x: mx.array, experts: mx.array, w: mx.array) -> mx.array:
    """Sorted gather_mm of assignment rows with their experts' matrices ``w`` [E, Din, Dout]."""
    return mx.gather_mm(x, w, rhs_indices=experts, sorted_indices=True)


def _freeze_buffers(module: nn.Module, names: list[str]) -> None:
    # Buffers are ordinary arrays (saved/loaded with the weights) that the optimizer must not see.
    module.freeze(keys=names, recurse=False)


# --------------------------------------------------------------------------------------------
# sigma-MoE feed-forward
# --------------------------------------------------------------------------------------------


class SigmaMoE(nn.Module):
    """sigma-MoE FFN: E experts of width ``expert_size``, top-k sigmoid routing (§5).

    ``y = sum_j w_j * relu(x K[e_j]) V[e_j]`` where the experts e_j are chosen from ``sel`` (the
    normalised residual) and ``x`` is the un-normalised residual.
    """

    def __init__(self, hidden_size: int, n_experts: int, expert_size: int, k: int, *,
                 init_scale: float, bias_balancing: bool = True, bias_update_rate: float = 1e-3,
                 bias_momentum: float = 0.9, bias_clip: float | None = 1.0,
                 entropy_coef: float = 0.01):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"k={k} must be in [1, n_experts={n_experts}]")
        self.hidden_size = hidden_size
        self.n_experts = n_experts
        self.expert_size = expert_size
        self.top_k = k
        self.bias_balancing = bias_balancing
        self.bias_update_rate = bias_update_rate
        self.bias_momentum = bias_momentum
        self.bias_clip = bias_clip
        self.entropy_coef = entropy_coef
        self.reset_parameters(init_scale)
        self.route_scale = mx.ones((1,))
        buffers = ["selector_target_std"]
        if bias_balancing:
            for name in ("expert_bias", "expert_token_count", "expert_running_load"):
                setattr(self, name, mx.zeros((n_experts,)))
                buffers.append(name)
        _freeze_buffers(self, buffers)

    def reset_parameters(self, scale: float) -> None:
        """Plain-normal init of §5: selector and keys std scale/sqrt(D), values scale/sqrt(E*es)."""
        D, E, es = self.hidden_size, self.n_experts, self.expert_size
        self.expert_sel, self.selector_target_std = _init_selector((E, D), scale / math.sqrt(D))
        # Item access: Module is a dict, so the attributes ``keys``/``values`` are dict methods.
        self["keys"] = mx.random.normal((E, D, es)) * (scale / math.sqrt(D))
        self["values"] = mx.random.normal((E, es, D)) * (scale / math.sqrt(E * es))

    def route(self, sel: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Router logits [..., E] (fp32), chosen experts [..., k] and their weights [..., k]."""
        logits = (sel @ self.expert_sel.T).astype(mx.float32)
        bias = self.expert_bias if self.bias_balancing else None
        idx, w = _route(logits, bias, self.top_k, self.route_scale)
        return logits, idx, w

    def __call__(self, x: mx.array, sel: mx.array, record: Record | None = None) -> mx.array:
        logits, idx, w = self.route(sel)
        if record is not None:
            record.append((self, "ff", logits, idx))
        D, k = x.shape[-1], self.top_k
        rows, experts, inverse = _dispatch(x.reshape(-1, D), idx.reshape(-1, k))
        hidden = nn.relu(_expert_mm(rows, experts, self["keys"]))
        y = _combine(_expert_mm(hidden, experts, self["values"]), inverse, w.reshape(-1, k))
        return y.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# SwitchHead attention
# --------------------------------------------------------------------------------------------


class SwitchHead(nn.Module):
    """SwitchHead attention with partial RoPE (§6): dense q/k, expert-mixed v and o per head.

    Each head picks k of its own E value experts and k of its E output experts; the global expert
    index (into ``v``, ``o``, the selectors and the [H*E] buffers) is ``h * E + e``.
    """

    def __init__(self, hidden_size: int, num_heads: int, n_experts: int, k: int, *,
                 init_scale: float, rope_theta: float = 10000.0, bias_balancing: bool = True,
                 bias_update_rate: float = 1e-3, bias_momentum: float = 0.9,
                 bias_clip: float | None = 1.0, entropy_coef: float = 0.001):
        super().__init__()
        if n_experts < 2:
            raise ValueError("SwitchHead needs n_experts >= 2 (the gated E=1 form is not ported)")
        if not 1 <= k <= n_experts:
            raise ValueError(f"k={k} must be in [1, n_experts={n_experts}]")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.n_experts = n_experts
        self.top_k = k
        self.bias_balancing = bias_balancing
        # The reference pre-multiplies the rate by sqrt(E) (E per head) in __init__.
        self.bias_update_rate = bias_update_rate * math.sqrt(n_experts)
        self.bias_momentum = bias_momentum
        self.bias_clip = bias_clip
        self.entropy_coef = entropy_coef
        # RoPE on the first half of each head (made even); 0 means no rotation at all.
        n_rot = int(0.5 * self.head_dim)
        n_rot -= n_rot % 2
        self.n_rot = n_rot if n_rot >= 2 else 0
        self.rope_theta = rope_theta
        self._freqs = rope_frequencies(self.n_rot, rope_theta) if self.n_rot else None

        HP = num_heads * self.head_dim
        self.q = nn.Linear(hidden_size, HP, bias=False)
        self.k = nn.Linear(hidden_size, HP, bias=False)
        self.reset_parameters(init_scale)
        self.route_scale = mx.ones((1,))
        buffers = ["sel_v_target_std", "sel_o_target_std"]
        if bias_balancing:
            HE = num_heads * n_experts
            for router in ("v", "o"):
                for name in (f"expert_{router}_bias", f"expert_{router}_token_count",
                             f"expert_{router}_running_load"):
                    setattr(self, name, mx.zeros((HE,)))
                    buffers.append(name)
        _freeze_buffers(self, buffers)

    def reset_parameters(self, scale: float) -> None:
        """§6: selectors, q, k, v ~ N(0,(scale/sqrt(D))^2) (selectors renormalised); o uses H*P."""
        D, H, P, E = self.hidden_size, self.num_heads, self.head_dim, self.n_experts
        std = scale / math.sqrt(D)
        self.sel_v, self.sel_v_target_std = _init_selector((H * E, D), std)
        self.sel_o, self.sel_o_target_std = _init_selector((H * E, D), std)
        self.k.weight = mx.random.normal((H * P, D)) * std
        self.q.weight = mx.random.normal((H * P, D)) * std
        self.v = mx.random.normal((H * E, D, P)) * std
        self.o = mx.random.normal((H * E, P, D)) * (scale / math.sqrt(H * P))

    def route(self, a: mx.array) -> tuple[tuple[mx.array, mx.array, mx.array], ...]:
        """(logits [B,T,H,E], local indices [B,T,H,k], weights [B,T,H,k]) for v and for o."""
        H, E = self.num_heads, self.n_experts
        out = []
        for router in ("v", "o"):
            w_sel = getattr(self, f"sel_{router}")
            logits = (a @ w_sel.T).astype(mx.float32).reshape(*a.shape[:-1], H, E)
            bias = getattr(self, f"expert_{router}_bias").reshape(H, E) if self.bias_balancing \
                else None
            idx, w = _route(logits, bias, self.top_k, self.route_scale)
            out.append((logits, idx, w))
        return tuple(out)

    def qk(self, a: mx.array, offset: int | mx.array = 0) -> tuple[mx.array, mx.array]:
        """q, k as [B, H, T, P], pre-scaled by P^-1/4 each (SDPA then runs with scale 1).

        ``offset`` is the RoPE position of the first token: an int, or (a left-padded batch
        cache) an array with one position per row.
        """
        B, T, _ = a.shape
        pre = self.head_dim ** -0.25
        q = (self.q(a) * pre).reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = (self.k(a) * pre).reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)
        if self.n_rot:
            q = apply_rope(q, self._freqs, offset, dims=self.n_rot)
            k = apply_rope(k, self._freqs, offset, dims=self.n_rot)
        return q, k

    def _global(self, idx: mx.array) -> mx.array:
        # Per-head local expert id -> row of v/o: h * E + e.
        heads = mx.arange(self.num_heads, dtype=idx.dtype)[:, None] * self.n_experts
        return idx + heads

    def __call__(self, a: mx.array, h: mx.array, cache: Any = None,
                 record: Record | None = None) -> mx.array:
        """``a = rms_norm(h)`` feeds q, k and both routers; ``h`` (un-normalised) feeds v.

        ``cache`` is one KV slot with the contract of ``layers.attention`` (``offset``,
        ``make_mask``, ``update_and_fetch``); it stores k after RoPE and the expert-mixed v.
        """
        B, T, D = h.shape
        H, P, k = self.num_heads, self.head_dim, self.top_k
        (lv, idx_v, w_v), (lo, idx_o, w_o) = self.route(a)
        if record is not None:
            record.append((self, "v", lv, idx_v))
            record.append((self, "o", lo, idx_o))

        # v[b, t, h] = sum_j w_v * h[b, t] @ V[h*E + e_j]: one assignment per (token, head, slot).
        rows, experts, inverse = _dispatch(h.reshape(-1, D), self._global(idx_v).reshape(-1, H, k))
        v = _combine(_expert_mm(rows, experts, self.v), inverse, w_v.reshape(-1, H, k))
        v = v.reshape(B, T, H, P).transpose(0, 2, 1, 3)

        q, kk = self.qk(a, 0 if cache is None else cache.offset)
        att = attention(q, kk, v, scale=1.0, cache=cache)  # [B, H, T, P]

        # out[b, t] = sum_h sum_j w_o * att[b, t, h] @ O[h*E + e_j]; heads and slots summed at once.
        att = att.transpose(0, 2, 1, 3).reshape(-1, P)
        rows, experts, inverse = _dispatch(att, self._global(idx_o).reshape(-1, k))
        out = _combine(_expert_mm(rows, experts, self.o), inverse, w_o.reshape(-1, H * k))
        return out.reshape(B, T, D)


# --------------------------------------------------------------------------------------------
# Training mechanics over a record / a model
# --------------------------------------------------------------------------------------------


def moe_modules(model: nn.Module) -> Iterator[tuple[str, SigmaMoE | SwitchHead]]:
    """(path, module) for every SigmaMoE / SwitchHead in ``model`` (path as in named_modules)."""
    for name, module in model.named_modules():
        if isinstance(module, (SigmaMoE, SwitchHead)):
            yield name, module


def _group(record: Record) -> dict[tuple[int, str], tuple[nn.Module, list, list]]:
    """Record entries grouped by (id(module), router), in order of first appearance."""
    groups: dict[tuple[int, str], tuple[nn.Module, list, list]] = {}
    for module, router, logits, idx in record:
        entry = groups.setdefault((id(module), router), (module, [], []))
        entry[1].append(logits)
        entry[2].append(idx)
    return groups


def _neg_marginal_entropy(logits: mx.array) -> mx.array:
    """-mean over [B, ...] of H(mean_tokens softmax(logits)) for logits [B, N, ..., E].

    Same as the reference's ``entropy_reg``: log of the averaged softmax via logsumexp - log N.
    """
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    log_mean = mx.logsumexp(logp, axis=1) - math.log(logits.shape[1])
    return (mx.exp(log_mean) * log_mean).sum(-1).mean()


def moe_entropy_reg(record: Record) -> mx.array:
    """sum over modules of ``entropy_coef * (negative entropy of the routing marginal)``.

    Per module and router the logits of all recorded calls are pooled with the tokens (one
    marginal per batch row, and per head for SwitchHead); a SwitchHead's v and o terms are summed.
    Calls that ran without gradient must be stop_gradient-ed by the caller. Returns 0.0 for an empty
    record.
    """
    total = mx.array(0.0)
    for module, logits, _ in _group(record).values():
        # Pool calls along the token axis (concatenation == the reference's stack + flatten).
        pooled = mx.concatenate([lg.reshape(lg.shape[0], -1, *lg.shape[2:]) for lg in logits], 1)
        total = total + module.entropy_coef * _neg_marginal_entropy(pooled)
    return total


def detach_record(record: Record, start: int = 0) -> None:
    """stop_gradient the logits of ``record[start:]`` in place (calls the reference runs under
    ``no_grad``: they still count for the entropy marginal and the expert counts)."""
    for i in range(start, len(record)):
        module, router, logits, idx = record[i]
        record[i] = (module, router, mx.stop_gradient(logits), idx)


_COUNT_NAME = {"ff": "expert_token_count", "v": "expert_v_token_count",
               "o": "expert_o_token_count"}


def expert_counts(record: Record, model: nn.Module) -> dict[str, mx.array]:
    """(token, slot) assignment counts per router over all recorded calls, padding included.

    Keys are the count buffers' parameter paths inside ``model`` (e.g.
    ``"L_level.layers.0.mlp.expert_token_count"``, ``"...self_attn.expert_v_token_count"``), values
    float32 arrays [E] (SigmaMoE) or [H*E] indexed ``h * E + e`` (SwitchHead). A plain dict of
    arrays, so a compiled train step can return it. Modules that were never called are absent.
    """
    paths = {id(m): name for name, m in moe_modules(model)}
    counts = {}
    for (key, router), (module, _, indices) in _group(record).items():
        if key not in paths:
            raise ValueError(f"recorded {type(module).__name__} is not part of the given model")
        if isinstance(module, SwitchHead):
            indices = [module._global(i) for i in indices]
            size = module.num_heads * module.n_experts
        else:
            size = module.n_experts
        flat = mx.concatenate([i.reshape(-1) for i in indices])
        c = mx.zeros((size,), dtype=mx.float32).at[flat].add(1.0)
        prefix = f"{paths[key]}." if paths[key] else ""
        counts[prefix + _COUNT_NAME[router]] = c
    return counts


def _routers(module: SigmaMoE | SwitchHead) -> list[tuple[str, str, str, str, str, int]]:
    """Per router: count, bias, running-load, selector and target-std names, E for the scale."""
    if isinstance(module, SigmaMoE):
        return [("expert_token_count", "expert_bias", "expert_running_load", "expert_sel",
                 "selector_target_std", module.n_experts)]
    return [(f"expert_{r}_token_count", f"expert_{r}_bias", f"expert_{r}_running_load",
             f"sel_{r}", f"sel_{r}_target_std", module.n_experts) for r in ("v", "o")]


def accumulate_expert_counts(model: nn.Module, counts: dict[str, mx.array]) -> None:
    """Add ``counts`` (from :func:`expert_counts`) into the modules' count buffers."""
    for name, module in moe_modules(model):
        if not module.bias_balancing:
            continue
        prefix = f"{name}." if name else ""
        for count_name, *_ in _routers(module):
            if prefix + count_name in counts:
                total = getattr(module, count_name) + counts[prefix + count_name]
                setattr(module, count_name, total)


def update_expert_bias(model: nn.Module, counts: dict[str, mx.array] | None = None) -> None:
    """Loss-free bias balancing (§5, §6) for every MoE module with ``bias_balancing``.

    The counts used are the module's count buffer plus ``counts`` (keyed as :func:`expert_counts`);
    ``load = c / sum(c)``, ``R <- m R + (1-m) load``, ``b <- b - rate s (R - 1/E_tot) E_tot``,
    clamped to ``+-clip s`` with ``s = target_std sqrt(D E)``; the count buffer is then zeroed.
    A router with zero total count is left untouched, as in the reference. Buffers are replaced by
    assignment, so this works inside a compiled step that captures the model state.
    """
    counts = counts or {}
    for name, module in moe_modules(model):
        if not module.bias_balancing:
            continue
        prefix = f"{name}." if name else ""
        for count_name, bias_name, load_name, _, std_name, n_exp in _routers(module):
            c = getattr(module, count_name)
            if prefix + count_name in counts:
                c = c + counts[prefix + count_name]
            setattr(module, count_name, mx.zeros_like(c))
            if module.n_experts <= 1:
                continue
            total = c.sum()
            load = c / mx.maximum(total, 1.0)
            running = getattr(module, load_name)
            if module.bias_momentum > 0:
                new_running = module.bias_momentum * running + (1 - module.bias_momentum) * load
                effective = new_running
            else:
                new_running, effective = running, load
            target = 1.0 / c.size
            scale = getattr(module, std_name) * math.sqrt(module.hidden_size * n_exp)
            bias = getattr(module, bias_name)
            new_bias = bias - module.bias_update_rate * scale * (effective - target) / target
            if module.bias_clip is not None:
                clip = module.bias_clip * scale
                new_bias = mx.clip(new_bias, -clip, clip)
            # No host sync: a zero total keeps the old state via a select instead of an `if`.
            any_tokens = total > 0
            setattr(module, load_name, mx.where(any_tokens, new_running, running))
            setattr(module, bias_name, mx.where(any_tokens, new_bias, bias))


def renorm_selectors(model: nn.Module) -> None:
    """After the optimizer step: selector rows to unit norm, matrix std back to its target (§5)."""
    for _, module in moe_modules(model):
        if not module.bias_balancing:
            continue
        for *_, sel_name, std_name, _ in _routers(module):
            setattr(module, sel_name,
                    _renorm_rows(getattr(module, sel_name), getattr(module, std_name)))


# --------------------------------------------------------------------------------------------
# Dense all-experts oracles (tests and benchmarks only: E/k times the compute)
# --------------------------------------------------------------------------------------------


def sigma_moe_dense(moe: SigmaMoE, x: mx.array, sel: mx.array) -> mx.array:
    """The reference's computation: every expert on every token, then gather the chosen k."""
    _, idx, w = moe.route(sel)
    scores = nn.relu(mx.einsum("btd,edh->bteh", x, moe["keys"]))
    values_all = mx.einsum("bteh,ehv->btev", scores, moe["values"])
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
    v_all = mx.einsum("btd,hedp->bthep", h, sh.v.reshape(H, E, D, P))
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
    o_all = mx.einsum("bhtp,hepq->btheq", att, sh.o.reshape(H, E, P, D))
    out = (mx.take_along_axis(o_all, idx_o[..., None], axis=3) * w_o[..., None]).sum(3)
    return out.sum(2)
