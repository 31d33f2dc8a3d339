"""MoE routers: top-k sigmoid routing with loss-free bias balancing, and the log of a forward.

A :class:`Router` owns its selector, its buffers (the selection bias, the assignment counts, the
running loads, the selector's target std) and the two updates of the training step: the bias
update before the optimizer step and the selector renorm after it. A :class:`RoutingLog` collects
every router call of one training forward (the recursion calls each router many times) for the
entropy regulariser and the expert counts. Nothing here syncs with the host, so a whole training
step traces into ``mx.compile``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def renorm_rows(w: mx.array, target_std: mx.array) -> mx.array:
    """Rows to unit L2 norm, then the whole matrix rescaled to ``target_std`` (unbiased std).

    The reference's ``renorm_keep_std``: torch.std uses N-1; both divisions clamp at 1e-12.
    """
    w = w / mx.maximum(mx.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    return w * (target_std / mx.maximum(mx.std(w, ddof=1), 1e-12))


def topk_indices(scores: mx.array, k: int) -> mx.array:
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


class Router(nn.Module):
    """Chooses k of E experts per token (per group: SwitchHead has one group of E per head).

    ``groups`` None: one set of E experts, logits [..., E]; an int G (even 1): logits
    [..., G, E]. The selector ``weight`` [G*E, D] gives fp32 logits [..., (G,) E]; the top k of
    ``logits + bias`` are chosen and weighted by their *unbiased* sigmoid, normalised over the k
    and scaled by the owner's ``route_scale``. The bias only decides which experts fire
    (loss-free balancing); :meth:`update_bias` moves it against each expert's running load.
    Expert ids are local to a group (0..E-1); :meth:`expert_ids` gives ``g * E + e``, the row of
    the owner's expert weights and of the [G*E] buffers.
    """

    def __init__(self, dims: int, n_experts: int, k: int, *, init_std: float,
                 groups: int | None = None,
                 bias_balancing: bool = True, bias_update_rate: float = 1e-3,
                 bias_momentum: float = 0.9, bias_clip: float | None = 1.0,
                 entropy_coef: float = 0.01):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"k={k} must be in [1, n_experts={n_experts}]")
        self.dims, self.n_experts, self.top_k = dims, n_experts, k
        self.grouped, self.groups = groups is not None, groups or 1
        self.bias_balancing = bias_balancing
        self.bias_update_rate = bias_update_rate
        self.bias_momentum = bias_momentum
        self.bias_clip = bias_clip
        self.entropy_coef = entropy_coef
        # N(0, std^2), rows renormalised; the target std is the *sampled* std (stored, as the
        # reference does), which every later renorm restores.
        n = self.groups * n_experts
        w = mx.random.normal((n, dims)) * init_std
        self.target_std = mx.maximum(mx.std(w, ddof=1), 1e-12)
        self.weight = renorm_rows(w, self.target_std)
        buffers = ["target_std"]
        if bias_balancing:
            self.bias = mx.zeros((n,))
            self.token_count = mx.zeros((n,))
            self.running_load = mx.zeros((n,))
            buffers += ["bias", "token_count", "running_load"]
        # Buffers: ordinary arrays (saved and loaded with the weights) the optimizer must not see.
        self.freeze(keys=buffers, recurse=False)

    def __call__(self, x: mx.array, route_scale: mx.array
                 ) -> tuple[mx.array, mx.array, mx.array]:
        """Logits [..., (G,) E] (fp32), chosen local ids [..., (G,) k] and weights [..., (G,) k].

        sigmoid is monotonic, so the top-k runs on ``logits + bias`` and sigmoid is evaluated only
        at the k chosen experts (on the CPU backend the [N, E] sigmoid was the layer's most
        expensive op). Only exact fp32 ties of the saturated sigmoid, which torch breaks
        arbitrarily, can choose differently. The order of the k choices is arbitrary, as torch's
        ``topk(sorted=False)``; consumers sum over it.
        """
        logits = (x @ self.weight.T).astype(mx.float32)
        if self.grouped:
            logits = logits.reshape(*x.shape[:-1], self.groups, self.n_experts)
        scores = logits
        if self.bias_balancing:
            scores = logits + self.bias.reshape(logits.shape[-2 if self.grouped else -1:])
        # Indices must not carry gradient: gathers with them would fail in the VJP.
        idx = mx.stop_gradient(topk_indices(mx.stop_gradient(scores), self.top_k))
        w = mx.sigmoid(mx.take_along_axis(logits, idx, axis=-1))
        w = w / mx.maximum(w.sum(axis=-1, keepdims=True), 1e-9) * route_scale
        # routing in float32 (its numerics), mixing in the activations' dtype (a float16 model
        # stays in float16)
        return logits, idx, w.astype(x.dtype)

    def expert_ids(self, idx: mx.array) -> mx.array:
        """Local ids [..., G, k] -> rows ``g * E + e`` of the [G*E] experts and buffers."""
        if not self.grouped:
            return idx
        return idx + mx.arange(self.groups, dtype=idx.dtype)[:, None] * self.n_experts

    def count(self, indices: list[mx.array]) -> mx.array:
        """(token, slot) assignments per expert [G*E] (float32) over the given calls' choices."""
        flat = mx.concatenate([self.expert_ids(i).reshape(-1) for i in indices])
        return mx.zeros((self.groups * self.n_experts,), dtype=mx.float32).at[flat].add(1.0)

    def entropy_reg(self, logits: list[mx.array]) -> mx.array:
        """``entropy_coef`` times minus the entropy of the routing marginal.

        The calls' logits [B, T, (G,) E] are pooled along the tokens (the reference stacks and
        flattens them); one marginal per batch row (and group), averaged. log of the averaged
        softmax via logsumexp - log N, as the reference's ``entropy_reg``.
        """
        pooled = mx.concatenate([lg.reshape(lg.shape[0], -1, *lg.shape[2:]) for lg in logits], 1)
        logp = pooled - mx.logsumexp(pooled, axis=-1, keepdims=True)
        log_mean = mx.logsumexp(logp, axis=1) - math.log(pooled.shape[1])
        return self.entropy_coef * (mx.exp(log_mean) * log_mean).sum(-1).mean()

    def update_bias(self, counts: mx.array | None = None) -> None:
        """Loss-free balancing from ``token_count`` (+ ``counts``), then the count is zeroed.

        ``load = c / sum(c)``, ``R <- m R + (1-m) load``, ``b <- b - rate s (R - 1/n) n`` with n
        = G*E, clamped to ``+-clip s``, ``s = target_std sqrt(D E)``. A router with zero total
        count is left untouched, as in the reference. Buffers are replaced by assignment, so this
        works inside a compiled step that captures the model state.
        """
        if not self.bias_balancing:
            return
        c = self.token_count if counts is None else self.token_count + counts
        self.token_count = mx.zeros_like(c)
        if self.n_experts <= 1:
            return
        total = c.sum()
        load = c / mx.maximum(total, 1.0)
        running = self.running_load
        if self.bias_momentum > 0:
            new_running = effective = self.bias_momentum * running + (1 - self.bias_momentum) * load
        else:
            new_running, effective = running, load
        target = 1.0 / c.size
        scale = self.target_std * math.sqrt(self.dims * self.n_experts)
        bias = self.bias - self.bias_update_rate * scale * (effective - target) / target
        if self.bias_clip is not None:
            bias = mx.clip(bias, -self.bias_clip * scale, self.bias_clip * scale)
        # No host sync: a zero total keeps the old state via a select instead of an `if`.
        any_tokens = total > 0
        self.running_load = mx.where(any_tokens, new_running, running)
        self.bias = mx.where(any_tokens, bias, self.bias)

    def renorm(self) -> None:
        """After the optimizer step: rows to unit norm, the matrix std back to its target.

        Only with bias balancing, as the reference trainer.
        """
        if self.bias_balancing:
            self.weight = renorm_rows(self.weight, self.target_std)


def routers(model: nn.Module) -> list[Router]:
    """Every router of ``model``, in a fixed order (that of ``named_modules``)."""
    return [m for _, m in model.named_modules() if isinstance(m, Router)]


class RoutingLog:
    """The router calls of one training forward: each router's logits and chosen experts.

    Layers call :meth:`add`; the training step then reads :meth:`entropy_reg` (the loss term) and
    :meth:`counts` (for the bias update). :meth:`detached` gives a view that records calls made
    "without gradient" (the reference's ``no_grad`` cycles): they count for the marginal and the
    counts but pass no gradient.
    """

    def __init__(self) -> None:
        self._calls: dict[int, tuple[Router, list[mx.array], list[mx.array]]] = {}
        self._detach = False

    def detached(self) -> RoutingLog:
        view = RoutingLog()
        view._calls, view._detach = self._calls, True
        return view

    def add(self, router: Router, logits: mx.array, idx: mx.array) -> None:
        _, all_logits, all_idx = self._calls.setdefault(id(router), (router, [], []))
        all_logits.append(mx.stop_gradient(logits) if self._detach else logits)
        all_idx.append(idx)

    def entries(self) -> list[tuple[Router, mx.array, mx.array]]:
        """Every recorded call as (router, logits, indices), router by router in call order."""
        return [(router, lg, idx) for router, logits, indices in self._calls.values()
                for lg, idx in zip(logits, indices)]

    def calls(self, router: Router) -> tuple[list[mx.array], list[mx.array]]:
        """(logits, indices) of every recorded call of ``router``, in call order."""
        _, logits, idx = self._calls.get(id(router), (router, [], []))
        return logits, idx

    def entropy_reg(self) -> mx.array:
        """Sum over the called routers of their entropy regulariser (0.0 when none was called)."""
        total = mx.array(0.0)
        for router, logits, _ in self._calls.values():
            total = total + router.entropy_reg(logits)
        return total

    def counts(self, routers: list[Router]) -> list[mx.array]:
        """Per router of ``routers``: its assignment counts [G*E] (zeros if never called).

        A plain list of arrays, so a compiled step can return it and ranks can sum it.
        """
        out = []
        for router in routers:
            _, idx = self.calls(router)
            out.append(router.count(idx) if idx else
                       mx.zeros((router.groups * router.n_experts,), dtype=mx.float32))
        return out
