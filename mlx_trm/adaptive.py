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
the steps it skipped, the keys/values of its last computed step at the same stage: Huginn's
adaptive decoding policy, which keeps every stage causal. :func:`adaptive_forward`
(teacher-forced evaluation) runs one parallel forward per ACT step over the whole sequence,
freezing halted positions with ``where``; :class:`AdaptiveDecoder` prefills the prompt with the
same rule, then runs each new token's ACT steps one at a time until it halts (rows of a batch
halt independently). Both give the same logits (tests/test_adaptive.py). With threshold 0,
``kl`` and ``latent`` never hold: every position runs all steps, today's fixed-depth forward.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .config import ConfigError
from .data import iterate_batches, load_eval_tokens
from .models import act_loss
from .models.layers import rms_norm

CRITERIA = ("kl", "latent", "q")
CACHE_BLOCK = 256  # buffers hold prompt + max_tokens rounded up to this; grown by it
WINDOW_BLOCK = 64  # decode attention reads the written columns rounded up to this


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
    if model.args.flat_transformer or n < 2:
        raise ConfigError(f"--adaptive-halt needs a model with more than one ACT step, this one "
                          f"runs {n}; drop --adaptive-halt or pass --halt-max-steps N (N > 1)")
    if min_steps < 1 or min_steps > n:
        raise ConfigError(f"--min-halt-steps must be between 1 and --halt-max-steps ({n}), got "
                          f"{min_steps}; lower it or raise --halt-max-steps")
    return HaltPolicy(criterion, float(threshold), int(min_steps), n)


# ----------------------------------------------------------------------------------------------
# Cache-like slots: one layer application's keys and values, frozen where a position halted


class Columns:
    """Where a chunk of new positions is written in the buffers (shared by every slot).

    ``index`` (int32 scalar) is the first new column, ``left_padding`` [B] the pad columns of
    each row; ``window`` the columns attention reads. Without buffers (``capacity`` None, the
    teacher-forced evaluation) the chunk is the whole sequence from position 0.
    """

    def __init__(self, index: mx.array | None = None, left_padding: mx.array | None = None,
                 capacity: int | None = None, window: int | None = None):
        self.index, self.left_padding = index, left_padding
        self.capacity, self.window = capacity, window
        self._masks: dict[int, mx.array] = {}
        if capacity is not None:
            self.offset = index - left_padding  # per-row RoPE position of the first new token
            self.start = index.reshape(1)
        else:
            self.offset = 0

    def make_mask(self, n: int) -> mx.array | str | None:
        if self.capacity is None:
            return "causal" if n > 1 else None
        if n not in self._masks:  # causal over the written columns, pad columns hidden
            col = mx.arange(self.window)
            row = self.index + mx.arange(n)[:, None]
            pad = self.left_padding[:, None, None, None]
            # a pad query sees itself (a query seeing no key would give NaN)
            self._masks[n] = (col <= row) & ((col >= pad) | (col == row))
        return self._masks[n]


class AdaptiveSlot:
    """The cache protocol (``offset``, ``make_mask``, ``update_and_fetch``) for one layer
    application of one ACT step: new keys/values where a position is active, its last computed
    ones (``last``) where it halted; written into the buffers when there are any."""

    def __init__(self, cols: Columns, active: mx.array, last: tuple | None,
                 keys: mx.array | None = None, values: mx.array | None = None):
        self.cols, self.active, self.last = cols, active, last
        self.keys, self.values = keys, values
        self.written: tuple[mx.array, mx.array] | None = None

    @property
    def offset(self) -> Any:
        return self.cols.offset

    def make_mask(self, n: int, **kwargs: Any) -> mx.array | str | None:
        return self.cols.make_mask(n)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        if self.last is not None:
            k = mx.where(self.active, k, self.last[0])
            v = mx.where(self.active, v, self.last[1])
        self.written = (k, v)
        if self.cols.capacity is None:
            return k, v
        self.keys, self.values = write_columns(self.keys, self.values, k, v, self.cols)
        W = self.cols.window
        return self.keys[..., :W, :], self.values[..., :W, :]


def write_columns(keys: mx.array | None, values: mx.array | None, k: mx.array, v: mx.array,
                  cols: Columns) -> tuple[mx.array, mx.array]:
    """``k``/``v`` [B, H, T, Dh] written at ``cols.index`` (buffers made on the first write)."""
    if keys is None:
        B, H, _, Dh = k.shape
        keys = mx.zeros((B, H, cols.capacity, Dh), k.dtype)
        values = mx.zeros((B, H, cols.capacity, v.shape[3]), v.dtype)
    return (mx.slice_update(keys, k, cols.start, axes=(2,)),
            mx.slice_update(values, v, cols.start, axes=(2,)))


# ----------------------------------------------------------------------------------------------
# One ACT step over a chunk of positions, with the halting rule


def final_norm(model: Any, z_H: mx.array) -> mx.array:
    """The read-out's input: rms_norm first for flat / MoEUT, z_H as is for dense TRM."""
    a = model.args
    return rms_norm(z_H, a.rms_norm_eps) if a.use_moeut or a.flat_transformer else z_H


def lm_logits(model: Any, z_H: mx.array) -> mx.array:
    return model.embed_tokens.as_linear(final_norm(model, z_H))


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
    logits = lm_logits(model, model.H_init.reshape(1, -1))[0]
    return logits - mx.logsumexp(logits)


def halt_signal(model: Any, policy: HaltPolicy, z_new: mx.array, state: dict
                ) -> tuple[mx.array, dict]:
    """Per position: whether the criterion holds after this step (and the state it carries)."""
    T = policy.threshold
    if policy.criterion == "kl":
        logits = lm_logits(model, z_new)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        # clamped: identical distributions can round to a tiny negative KL, and at threshold 0
        # nothing may halt
        kl = mx.maximum((mx.exp(logp) * (logp - state["logp"])).sum(axis=-1), 0.0)
        return kl < T, {"logp": logp}
    if policy.criterion == "latent":
        change = mx.linalg.norm(z_new - state["z_H"], axis=-1)
        return change < T * mx.linalg.norm(z_new, axis=-1), {}
    q = model.q_head(final_norm(model, z_new))
    return q[..., 1] - q[..., 0] < T, {}


def act_step(model: Any, policy: HaltPolicy, tokens: mx.array, state: dict, active: mx.array,
             lasts: list | None, keys: list, values: list, cols: Columns, can_halt: bool,
             final: bool) -> tuple[dict, mx.array, list, list, list]:
    """One ACT step of every position of a chunk; positions not ``active`` keep their latents
    and keys/values. Returns the new state, who is still active, and the slots' keys/values
    (``lasts``: each slot's entries for this chunk; ``keys``/``values``: its buffers)."""
    kv_active = active.reshape(active.shape[0], 1, -1, 1)  # [B, 1, T, 1] against [B, H, T, Dh]
    slots = [AdaptiveSlot(cols, kv_active, lasts[j] if lasts else None, keys[j], values[j])
             for j in range(len(keys))]
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
    table = model.__dict__.setdefault("_adaptive_compiled", {})
    key = (name, policy.criterion, policy.threshold, policy.min_steps, policy.max_steps)
    if key not in table:
        table[key] = mx.compile(fn, inputs=model.state)
    return table[key]


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
        state, still, lasts, _, _ = act_step(model, policy, tokens, state, active, lasts, none,
                                             none, Columns(), can_halt, final)
        return state, still, lasts

    run = _compiled(model, policy, "eval", step) if compile else step
    for k in range(policy.max_steps):
        if k > 0 and not active.any().item():
            break
        steps = steps + active
        state, active, lasts = run(tokens, state, active, lasts, k + 1 >= policy.min_steps,
                                   k + 1 == policy.max_steps)
    return lm_logits(model, state["z_H"]), steps


def evaluate_adaptive(model: Any, tokenizer: Any, data: str, policy: HaltPolicy, *,
                      split: str = "validation", batch_size: int = 16, seq_len: int | None = None,
                      max_stories: int | None = None, text_field: str = "text",
                      compile: bool = True) -> dict[str, float]:
    """Held-out token CE under ``policy`` (the batches and masking of ``evaluate_model``)."""
    seq_len = seq_len or model.args.seq_len
    dataset = load_eval_tokens(data, tokenizer, split, text_field=text_field,
                               max_stories=max_stories)
    sums = np.zeros(4)  # CE sum, tokens, correct, ACT steps over the predicted tokens
    for inputs, labels in iterate_batches(dataset, batch_size, seq_len):
        inputs, labels = mx.array(inputs), mx.array(labels)
        logits, steps = adaptive_forward(model, inputs, policy, compile=compile)
        # the one loss (no q head read here): at threshold 0 this is evaluate_model's CE
        _, m = act_loss({"logits": logits}, labels)
        counted = (steps * (labels >= 0)).sum()
        sums += np.array(mx.stack([m["token_ce_sum"], m["n_tokens"].astype(mx.float32),
                                   m["correct"].astype(mx.float32),
                                   counted.astype(mx.float32)]), dtype=np.float64)
    n = max(sums[1], 1.0)
    return {"stories": dataset.n_stories, "tokens": int(sums[1]), "token_ce": sums[0] / n,
            "perplexity": math.exp(min(sums[0] / n, 50.0)), "accuracy": sums[2] / n,
            "act_steps_per_token": sums[3] / n}


# ----------------------------------------------------------------------------------------------
# Cached decoding


class AdaptiveDecoder:
    """Prefill the prompts with the halting rule per position, then decode one position per call,
    running its ACT steps until it halts (the interface of ``generate``'s decoders).

    The cache holds one buffer per (ACT step, layer application), [B, H, capacity, Dh]. After a
    chunk halts at step n, its keys/values of step n are copied into the slots of steps n+1..N,
    where later tokens read them.
    """

    def __init__(self, model: Any, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                 policy: HaltPolicy, compile: bool = True, prefill_step_size: int = 512):
        self.model, self.policy, self.compile = model, policy, compile
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("a prompt is empty (no tokens); the model adds no BOS, so "
                              "generation needs at least one prompt token")
        L = max(len(p) for p in prompts)  # left-padded with id 0, as generate's decoders
        padding = [L - len(p) for p in prompts]
        self.tokens = mx.array([[0] * n + list(p) for n, p in zip(padding, prompts)], mx.int32)
        self.written = 0  # columns written so far
        room = min(max_tokens, 8 * CACHE_BLOCK) if max_tokens > 0 else CACHE_BLOCK
        self.capacity = -(-(self.tokens.shape[1] + room) // CACHE_BLOCK) * CACHE_BLOCK
        self.left_padding = mx.array(padding, dtype=mx.int32)
        S = model.args.layer_applications_per_act_step
        self.keys = [[None] * S for _ in range(policy.max_steps)]
        self.values = [[None] * S for _ in range(policy.max_steps)]
        self.prefill_step_size = prefill_step_size
        self._logp0 = step0_logp(model) if policy.criterion == "kl" else None

    def prefill(self) -> mx.array:
        L, n = self.tokens.shape[1], self.prefill_step_size
        for start in range(0, L, n):
            chunk = self.tokens[:, start:start + n]
            col = start + mx.arange(chunk.shape[1])
            logits = self._run(chunk, col[None, :] >= self.left_padding[:, None], prompt=True)
        return logits[:, -1]

    def __call__(self, tokens: mx.array) -> mx.array:
        if self.written + 1 > self.capacity:  # unbounded generation: grow a block
            self._grow(CACHE_BLOCK)
        # dense layers take rows [B, D] for one position (as the model's own decode path)
        x = tokens[:, None] if self.model.args.use_moeut else tokens
        logits = self._run(x, mx.ones(x.shape, dtype=mx.bool_), prompt=False)
        return logits.reshape(tokens.shape[0], -1)

    def _run(self, x: mx.array, active: mx.array, prompt: bool) -> mx.array:
        model, policy, N = self.model, self.policy, self.policy.max_steps
        T = 1 if x.ndim == 1 else x.shape[1]
        # a decode step reads the written columns rounded up to a block (one trace per block)
        window = self.written + T
        if not prompt:
            window = -(-window // WINDOW_BLOCK) * WINDOW_BLOCK
        window = min(window, self.capacity)
        index = mx.array(self.written, dtype=mx.int32)
        step = self._step_fn(prompt)
        state = initial_state(model, policy, x.shape, self._logp0)
        lasts, done = None, N
        for k in range(N):
            n_active = active.sum().item()  # the sync that lets a halted token skip its steps
            if n_active == 0:
                done = k
                break
            if not prompt:
                policy.act_steps += n_active
            state, active, lasts, self.keys[k], self.values[k] = step(
                x, state, active, lasts, self.keys[k], self.values[k], index, self.left_padding,
                self.capacity, window, k + 1 >= policy.min_steps, k + 1 == N)
        if done < N:  # the steps this chunk skipped read its last computed keys/values
            fill = self._fill_fn(prompt)
            self.keys[done:], self.values[done:] = fill(self.keys[done:], self.values[done:],
                                                        lasts, index, self.capacity)
        if not prompt:
            policy.tokens += x.shape[0]
        self.written += T
        return lm_logits(model, state["z_H"])

    def _step_fn(self, prompt: bool) -> Any:
        model, policy = self.model, self.policy

        def step(x, state, active, lasts, keys, values, index, left_padding, capacity, window,
                 can_halt, final):
            cols = Columns(index, left_padding, capacity, window)
            return act_step(model, policy, x, state, active, lasts, keys, values, cols,
                            can_halt, final)

        # a prompt's shapes (and its first writes, which make the buffers) are traced once
        if prompt or not self.compile:
            return step
        return _compiled(model, policy, "decode", step)

    def _fill_fn(self, prompt: bool) -> Any:
        def fill(keys, values, lasts, index, capacity):
            cols = Columns(index, mx.zeros((1,), mx.int32), capacity, capacity)
            out = [[write_columns(k, v, *last, cols) for k, v, last in zip(ks, vs, lasts)]
                   for ks, vs in zip(keys, values)]
            return [[kv[0] for kv in row] for row in out], [[kv[1] for kv in row] for row in out]

        if prompt or not self.compile:
            return fill
        return _compiled(self.model, self.policy, "fill", fill)

    def _grow(self, extra: int) -> None:
        self.capacity += extra
        for ks, vs in zip(self.keys, self.values):
            for j, (k, v) in enumerate(zip(ks, vs)):
                pad = [(0, 0), (0, 0), (0, extra), (0, 0)]
                ks[j], vs[j] = mx.pad(k, pad), mx.pad(v, pad)


# ----------------------------------------------------------------------------------------------
# Command line (generate, chat, evaluate)

# --halt-threshold when none is given: measured on the dense TRM + ACT 1M model's sweep
# (benchmarks/results/adaptive_recursion.md); q's 0 is the model's own rule
DEFAULT_THRESHOLDS = {"kl": 0.0, "latent": 0.0, "q": 0.0}


def add_adaptive_arguments(parser: Any) -> None:
    parser.add_argument("--adaptive-halt", default=None, metavar="{kl,latent,q}",
                        help="halt each token's ACT steps on its own: kl (next-token "
                        "distributions stop changing), latent (z_H stops changing) or q (the "
                        "model's q-halt head); default: every token runs --halt-max-steps")
    parser.add_argument("--halt-threshold", type=float, default=None,
                        help="halt when the criterion is below this (kl, latent: 0 = never; "
                        "q: q_continue - q_halt, 0 = the model's rule)")
    parser.add_argument("--min-halt-steps", type=int, default=1,
                        help="ACT steps every token runs before it may halt (default 1)")


def policy_from_args(model: Any, args: Any) -> HaltPolicy | None:
    """The policy the --adaptive-halt flags ask for (None without them)."""
    if args.adaptive_halt is None:
        if args.halt_threshold is not None or args.min_halt_steps != 1:
            raise ConfigError("--halt-threshold and --min-halt-steps only apply with "
                              "--adaptive-halt {kl,latent,q}; add it or drop them")
        return None
    threshold = args.halt_threshold
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS.get(args.adaptive_halt, 0.0)
    return halt_policy(model, args.adaptive_halt, threshold, args.min_halt_steps)


def steps_line(policy: HaltPolicy) -> str:
    return f"ACT steps per token: {policy.steps_per_token:.2f}"
