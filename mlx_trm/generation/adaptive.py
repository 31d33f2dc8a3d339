"""Adaptive recursion per token: each position runs only the ACT steps it needs.

At inference the reference runs every position through all ``halt_max_steps`` ACT steps (its
halting target, "every token of the row is exact", is one a language model never meets). Here
each position halts on its own, after at least ``min_steps`` and at most ``max_steps`` steps,
as soon as a criterion holds after ACT step k (step 0 is the initial latent ``H_init``):

- ``kl``:     KL(p_k || p_{k-1}) of its next-token distributions is below the threshold;
- ``latent``: ||z_H,k - z_H,k-1|| / ||z_H,k|| is below the threshold;
- ``q``:      q_continue - q_halt is below the threshold (the model's q head read at every
              position; threshold 0 is the model's own rule, q_halt > q_continue).

A halted position keeps its latents (its logits are those of its last computed step) and, for
the steps it skipped, the keys/values of its last computed step at the same stage (the cache
slots' ``keep``): Huginn's adaptive decoding policy, which keeps every stage causal.
:func:`adaptive_forward` (teacher-forced evaluation) runs one parallel forward per ACT step over
the whole sequence, freezing halted positions with ``where``; :class:`AdaptiveDecoder` prefills
the prompt with the same rule, then runs each new token's ACT steps one at a time until it halts
(rows of a batch halt independently). Both give the same logits (tests/test_adaptive.py). With
threshold 0, ``kl`` and ``latent`` never hold: every position runs all steps, the fixed depth.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..config import ConfigError
from .cache import CachePositions, slots_over
from .decoders import CachedDecoder, compiled, step_inputs

CRITERIA = ("kl", "latent", "q")


@dataclass
class HaltPolicy:
    """When a position stops refining; also counts the ACT steps a decoder ran for it."""

    criterion: str
    threshold: float
    min_steps: int
    max_steps: int
    tokens: int = 0  # positions decoded (prompt excluded) ...
    act_steps: int = 0  # ... and the ACT steps they ran

    @property
    def steps_per_token(self) -> float:
        return self.act_steps / max(self.tokens, 1)


def halt_policy(model: Any, criterion: str, threshold: float = 0.0,
                min_steps: int = 1) -> HaltPolicy:
    """A validated policy for ``model`` (its ``halt_max_steps``, possibly overridden at load)."""
    if criterion not in CRITERIA:
        close = difflib.get_close_matches(criterion, CRITERIA, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown --adaptive-halt '{criterion}'; {hint}choose one of "
                          + ", ".join(CRITERIA))
    if not threshold >= 0:  # also refuses NaN
        raise ConfigError(f"--halt-threshold must be >= 0 (got {threshold}); 0 runs every ACT "
                          "step for kl and latent, larger values halt earlier")
    n = model.args.halt_max_steps
    if model.args.flat_transformer:
        raise ConfigError("--adaptive-halt needs a recursive model; this one is a flat "
                          "transformer (no ACT steps to halt): drop --adaptive-halt")
    if n < 2:
        raise ConfigError(f"--adaptive-halt needs a model with more than one ACT step, this one "
                          f"runs {n}; drop --adaptive-halt or pass --halt-max-steps N (N > 1)")
    if min_steps < 1 or min_steps > n:
        raise ConfigError(f"--min-halt-steps must be between 1 and --halt-max-steps ({n}), got "
                          f"{min_steps}; lower it or raise --halt-max-steps")
    return HaltPolicy(criterion, float(threshold), int(min_steps), n)


# ----------------------------------------------------------------------------------------------
# One ACT step over a chunk of positions, with the halting rule


def initial_state(model: Any, policy: HaltPolicy, shape: tuple[int, ...],
                  logp0: mx.array | None = None) -> dict:
    """Latents at H_init / L_init; ``logp`` (kl only) is step 0's read-out of H_init (the same
    for every position: pass it as ``logp0`` once computed)."""
    z_H, z_L = model.initial_latents(*shape)
    state = {"z_H": z_H, "z_L": z_L}
    if policy.criterion == "kl":
        logp0 = step0_logp(model) if logp0 is None else logp0
        state["logp"] = mx.broadcast_to(logp0, (*shape, logp0.shape[0]))
    return state


def step0_logp(model: Any) -> mx.array:
    """Log-probabilities [V] read out of H_init: the "previous step" of ACT step 1 for kl."""
    logits = model.logits(model.H_init.reshape(1, -1))[0]
    return logits - mx.logsumexp(logits)


def halt_signal(model: Any, policy: HaltPolicy, z_new: mx.array, state: dict
                ) -> tuple[mx.array, dict]:
    """Per position: whether the criterion holds after this step (and the state it carries)."""
    T = policy.threshold
    if policy.criterion == "kl":
        logits = model.logits(z_new)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        # clamped: identical distributions can round to a tiny negative KL, and at threshold 0
        # nothing may halt
        kl = mx.maximum((mx.exp(logp) * (logp - state["logp"])).sum(axis=-1), 0.0)
        return kl < T, {"logp": logp}
    if policy.criterion == "latent":
        change = mx.linalg.norm(z_new - state["z_H"], axis=-1)
        return change < T * mx.linalg.norm(z_new, axis=-1), {}
    q = model.q_head(model.final_norm(z_new))
    return q[..., 1] - q[..., 0] < T, {}


def adaptive_step(model: Any, policy: HaltPolicy, tokens: mx.array, state: dict,
                  active: mx.array, lasts: list | None, keys: list, values: list,
                  positions: CachePositions, can_halt: bool, final: bool
                  ) -> tuple[dict, mx.array, list, list, list]:
    """One ACT step of every position of a chunk; positions not ``active`` keep their latents
    and keys/values. Returns the new state, who is still active, and the slots' keys/values
    (``lasts``: each slot's entries for this chunk; ``keys``/``values``: its buffers)."""
    positions.active = active.reshape(active.shape[0], 1, -1, 1)  # against [B, H, T, Dh]
    slots = slots_over(positions, keys, values, lasts)
    z_H, z_L = model.refine(state["z_H"], state["z_L"], tokens, iter(slots))
    a = active[..., None]
    z_H = mx.where(a, z_H, state["z_H"])
    z_L = mx.where(a, z_L, state["z_L"])
    if final:
        new_state, still = {"z_H": z_H, "z_L": z_L}, mx.zeros_like(active)
    else:
        holds, extra = halt_signal(model, policy, z_H, state)
        new_state = {"z_H": z_H, "z_L": z_L, **extra}
        still = active & ~holds if can_halt else active
    return (new_state, still, [s.written for s in slots], [s.keys for s in slots],
            [s.values for s in slots])


def _compiled(model: Any, policy: HaltPolicy, name: str, fn: Any) -> Any:
    """``fn`` compiled once per model and policy (weights as inputs, so updates stay visible)."""
    key = ("adaptive", name, policy.criterion, policy.threshold, policy.min_steps,
           policy.max_steps)
    return compiled(model, key, lambda: fn)


# ----------------------------------------------------------------------------------------------
# Teacher-forced evaluation: one parallel forward per ACT step


def adaptive_forward(model: Any, tokens: mx.array, policy: HaltPolicy, compile: bool = False
                     ) -> tuple[mx.array, mx.array]:
    """Logits [B, T, V] and ACT steps run [B, T] of every position of ``tokens`` [B, T].

    Every position starts at step 0; the whole sequence runs each ACT step in parallel (one
    forward per step) and stops once no position is active.
    """
    S = model.args.layer_applications_per_act_step
    state = initial_state(model, policy, tokens.shape)
    active = mx.ones(tokens.shape, dtype=mx.bool_)
    steps = mx.zeros(tokens.shape, dtype=mx.int32)
    lasts = None
    none = [None] * S

    def step(tokens, state, active, lasts, can_halt, final):
        state, still, lasts, _, _ = adaptive_step(model, policy, tokens, state, active, lasts,
                                                  none, none, CachePositions(), can_halt, final)
        return state, still, lasts

    run = _compiled(model, policy, "eval", step) if compile else step
    for k in range(policy.max_steps):
        if k > 0 and not active.any().item():
            break
        steps = steps + active
        state, active, lasts = run(tokens, state, active, lasts, k + 1 >= policy.min_steps,
                                   k + 1 == policy.max_steps)
    return model.logits(state["z_H"]), steps


# ----------------------------------------------------------------------------------------------
# Cached decoding


class AdaptiveDecoder(CachedDecoder):
    """Prefill the prompts with the halting rule per position, then decode one position per call,
    running its ACT steps until it halts.

    The cache is the fixed-depth decoder's (one slot per layer application of every ACT step).
    After a chunk halts at step n, its keys/values of step n are written into the slots of steps
    n+1..N, where later tokens read them. Each ACT step is its own compiled call: the sync
    between steps is what lets a halted token skip the rest.
    """

    def __init__(self, model: Any, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                 policy: HaltPolicy, compile: bool = True, prefill_step_size: int = 512):
        super().__init__(model, prompts, max_tokens, compile=compile,
                         prefill_step_size=prefill_step_size)
        self.policy = policy
        self._logp0 = step0_logp(model) if policy.criterion == "kl" else None

    def prefill(self) -> mx.array:
        L, n = self.tokens.shape[1], self.prefill_step_size
        pad = self.positions.left_padding[:, None]
        for start in range(0, L, n):
            chunk = self.tokens[:, start:start + n]
            col = start + mx.arange(chunk.shape[1])
            logits = self._run(chunk, col[None, :] >= pad, start, start + chunk.shape[1], False)
        return logits[:, -1]

    def __call__(self, tokens: mx.array) -> mx.array:
        x = step_inputs(self.model, tokens)
        logits = self._run(x, mx.ones(x.shape, dtype=mx.bool_), self.length, self.make_room(1),
                           True)
        self.policy.tokens += tokens.shape[0]
        self.length += 1
        return logits.reshape(tokens.shape[0], -1)

    def _run(self, x: mx.array, active: mx.array, start: int, window: int, decoding: bool
             ) -> mx.array:
        """ACT steps of the positions ``x`` written from column ``start`` until all halt."""
        model, policy, N = self.model, self.policy, self.policy.max_steps
        S = model.args.layer_applications_per_act_step
        index = mx.array(start, dtype=mx.int32)
        self.positions.index = index
        step = self._step_fn(decoding)
        state = initial_state(model, policy, x.shape, self._logp0)
        lasts, done = None, N
        for k in range(N):
            n_active = active.sum().item()  # the sync that lets a halted token skip its steps
            if n_active == 0:
                done = k
                break
            if decoding:
                policy.act_steps += n_active
            slots = self.cache[k * S:(k + 1) * S]
            state, active, lasts = self.run_slots(
                step, x, slots, state, active, lasts, k + 1 >= policy.min_steps, k + 1 == N,
                window=window)
        if done < N:  # the steps this chunk skipped read its last computed keys/values
            slots = self.cache[done * S:]
            fill = (compiled(model, ("adaptive fill", len(slots)), lambda: _fill) if decoding
                    and self.compile else _fill)
            self.run_slots(fill, lasts * (N - done), slots, window=window)
        self.positions.advance(x.shape[1] if x.ndim == 2 else 1)
        return model.logits(state["z_H"])

    def run_slots(self, step: Any, x: Any, slots: list, *args: Any, window: int) -> Any:
        pos = self.positions
        *out, keys, values = step(x, pos.index, pos.left_padding, *args,
                                  [c.keys for c in slots], [c.values for c in slots],
                                  pos.capacity, window)
        for c, k, v in zip(slots, keys, values):
            c.keys, c.values = k, v
        return out

    def _step_fn(self, decoding: bool) -> Any:
        model, policy = self.model, self.policy

        def step(x, index, left_padding, state, active, lasts, can_halt, final, keys, values,
                 capacity, window):
            positions = CachePositions(index, left_padding, capacity, window)
            state, still, written, keys, values = adaptive_step(
                model, policy, x, state, active, lasts, keys, values, positions, can_halt,
                final)
            return state, still, written, keys, values

        # a prompt's shapes (and its first writes, which make the buffers) are traced once
        if not decoding or not self.compile:
            return step
        return _compiled(model, policy, "decode", step)


def _fill(lasts: list, index: mx.array, left_padding: mx.array, keys: list, values: list,
          capacity: int, window: int) -> tuple[list, list]:
    """Write each slot's ``lasts`` entry at ``index`` (the skipped steps of a halted chunk)."""
    positions = CachePositions(index, left_padding, capacity, window)
    slots = slots_over(positions, keys, values)
    for slot, last in zip(slots, lasts):
        slot.update_and_fetch(*last)
    return [c.keys for c in slots], [c.values for c in slots]
