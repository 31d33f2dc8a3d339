"""Exact speculative recursion: the early ACT steps draft, the later ones verify K tokens at once.

A decode step of a recursive model applies the same small weights 56 times to one position: it
is bound by per-operation overhead and one-row matrix products, not arithmetic. With ACT carry
the first N ACT steps of the model are a complete model of their own (deep supervision trained
every step's read-out), and the keys and values they write are exactly the full model's cache
entries of those steps. So a round of :class:`SpeculativeDecoder`:

1. drafts K tokens one at a time with ACT steps 1..N only, writing their keys and values into
   the real cache and keeping each position's latents after step N (K + 1 positions: the last
   emitted token and the K drafts);
2. runs ACT steps N+1..halt_max_steps once over those K + 1 positions from those latents (one
   multi-token pass per step: the weights are read once for K + 1 tokens);
3. accepts the longest prefix where the verifier's token equals the draft, emits the verifier's
   tokens up to and including the first disagreement (all K + 1 when every draft agrees), and
   rewinds every slot of every step to the last emitted position.

Why it is exact: the verifier's latents, keys and values at each position are those of the
plain full-depth decode (the draft ran the same first N steps on the same inputs, and every
stage is causal), and every emitted token is the verifier's own (``sample`` of its logits),
so greedy output equals plain greedy decoding token for token and a sampled output is a sample
of the full-depth model, as in mlx-lm's speculative loop. A draft token only decides how many
of the verifier's tokens one round can emit.

A separate, smaller draft model with the same tokenizer (``draft_model``) works the same way
with its own cache; the verifier then runs every ACT step of the model over the K + 1
positions.
In a batch every row keeps the same number of tokens, the fewest any row accepted: a row that
accepted more keeps the verifier's tokens there, which equal its drafts, so it stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError
from .cache import CachePositions, slots_over
from .decoders import CachedDecoder, Sample, compiled, run_act_steps, step_inputs


@dataclass
class Speculation:
    """What drafts (the model's first ``draft_steps`` ACT steps, or ``draft_model``), how many
    tokens a round drafts, and what the rounds gave."""

    num_draft_tokens: int = 3
    draft_steps: int | None = None
    draft_model: nn.Module | None = None
    rounds: int = 0  # verification passes ...
    drafted: int = 0  # ... the draft tokens they checked ...
    accepted: int = 0  # ... the ones the verifier agreed with ...
    emitted: int = 0  # ... and the tokens the rounds gave

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / max(self.rounds, 1)

    def line(self) -> str:
        return (f"Draft acceptance: {self.acceptance:.1%} ({self.accepted}/{self.drafted}), "
                f"{self.tokens_per_pass:.2f} tokens per verification pass")


def speculation(model: nn.Module, num_draft_tokens: int = 3, draft_steps: int | None = None,
                draft_model: nn.Module | None = None) -> Speculation:
    """A validated :class:`Speculation` for ``model``."""
    if (draft_steps is None) == (draft_model is None):
        raise ConfigError("speculative decoding drafts with either the model's first ACT steps "
                          "(--draft-steps N) or a separate model (--draft-model DIR); give one")
    if num_draft_tokens < 1:
        raise ConfigError(f"--num-draft-tokens must be >= 1 (got {num_draft_tokens})")
    n = model.args.halt_max_steps
    if draft_steps is not None and (model.args.flat_transformer or n < 2):
        what = "is a flat transformer" if model.args.flat_transformer else f"runs {n}"
        raise ConfigError(f"--draft-steps needs a model with more than one ACT step, this one "
                          f"{what}: nothing earlier to draft with; use --draft-model DIR")
    if draft_steps is not None and not 1 <= draft_steps < n:
        raise ConfigError(f"--draft-steps must be between 1 and {n - 1}, got {draft_steps}: the "
                          f"model runs {n} ACT steps and the later ones verify the draft")
    if draft_model is not None and draft_model.args.vocab_size != model.args.vocab_size:
        raise ConfigError(f"the draft model's vocabulary ({draft_model.args.vocab_size}) is not "
                          f"the model's ({model.args.vocab_size}); it needs the same tokenizer")
    return Speculation(num_draft_tokens, draft_steps, draft_model)


def _draft_step(model: nn.Module):
    """One position [B] through the draft's ACT steps (the slots given): logits [B, V] and the
    latents after the last of them."""

    def step(tokens, index, left_padding, keys, values, window):
        positions = CachePositions(index, left_padding, keys[0].shape[2], window)
        slots = slots_over(positions, keys, values)
        x = step_inputs(model, tokens)
        z_H, z_L = run_act_steps(model, x, *model.initial_latents(*x.shape), slots)
        logits = model.logits(z_H).reshape(tokens.shape[0], -1)
        return logits, z_H, z_L, [c.keys for c in slots], [c.values for c in slots]

    return step


def _verify_step(model: nn.Module):
    """K positions [B, K] through the remaining ACT steps from the draft's latents: logits
    [B, K, V]."""

    def step(tokens, index, left_padding, z_H, z_L, keys, values, window):
        positions = CachePositions(index, left_padding, keys[0].shape[2], window)
        slots = slots_over(positions, keys, values)
        z_H, z_L = run_act_steps(model, tokens, z_H, z_L, slots)
        return model.logits(z_H), [c.keys for c in slots], [c.values for c in slots]

    return step


class SpeculativeDecoder(CachedDecoder):
    """The fixed-depth decoder whose ``step`` runs one speculative round (module docstring)."""

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                 speculation: Speculation, compile: bool = True, prefill_step_size: int = 512):
        K = speculation.num_draft_tokens
        room = max_tokens + K if max_tokens > 0 else max_tokens
        super().__init__(model, prompts, room, compile=compile,
                         prefill_step_size=prefill_step_size)
        self.spec = speculation
        self.drafter: CachedDecoder | None = None
        self.split = 0  # the slots of the drafting ACT steps: cache[:split]
        if speculation.draft_model is not None:
            self.drafter = CachedDecoder(speculation.draft_model, prompts, room, compile=compile,
                                         prefill_step_size=prefill_step_size)
        else:
            self.split = speculation.draft_steps * model.args.layer_applications_per_act_step
        # one position through the draft's ACT steps, and K + 1 positions through the rest
        self.draft_pass = self._compiled("draft", _draft_step)
        self.verify_pass = self._compiled(("verify", K), _verify_step)

    def _compiled(self, name: Any, make: Any) -> Any:
        if not self.compile:
            return make(self.model)
        return compiled(self.model, ("speculative", name, self.split), lambda: make(self.model))

    def prefill(self) -> mx.array:
        if self.drafter is not None:
            self.drafter.prefill()
        return super().prefill()

    def step(self, y: mx.array, sample: Sample) -> list[tuple[mx.array, mx.array]]:
        """One round: draft K tokens after ``y``, verify them at once, keep what agrees."""
        K, B = self.spec.num_draft_tokens, y.shape[0]
        drafts, z_H, z_L = self._draft_tokens(y, K, sample)
        inputs = mx.stack([y, *drafts], axis=1)  # the K + 1 positions the round writes
        if z_H is None:  # a separate draft model: the verifier runs every ACT step
            z_H, z_L = self.model.initial_latents(B, K + 1)
        logits, = self.run(self.verify_pass, inputs, self.cache[self.split:], z_H, z_L)
        tokens, logprobs = sample(logits.reshape(B * (K + 1), -1))
        tokens, logprobs = tokens.reshape(B, K + 1), logprobs.reshape(B, K + 1, -1)
        agree = (mx.stack(drafts, axis=1) == tokens[:, :K]).astype(mx.int32)
        accepted = mx.cumprod(agree, axis=1).sum(axis=1).min().item()  # the round's one sync
        n = accepted + 1
        # keep columns L .. L+n-1 (y and the first n-1 emitted tokens); those after are masked
        # and written over later
        self.advance(n)
        if self.drafter is not None:
            self.drafter.rewind(K + 1 - n)
        s = self.spec
        s.rounds, s.drafted, s.accepted, s.emitted = (
            s.rounds + 1, s.drafted + K, s.accepted + accepted, s.emitted + n)
        return [(tokens[:, i], logprobs[:, i]) for i in range(n)]

    def _draft_tokens(self, y: mx.array, K: int, sample: Sample
                      ) -> tuple[list[mx.array], mx.array | None, mx.array | None]:
        """K draft tokens after ``y`` (lazy: nothing waits for them), and with self-drafting the
        latents after the draft steps of ``y`` and every draft, [B, K + 1, D]; the main cache is
        left at the round's first column. The last draft runs the draft steps too (its sample is
        not used), so that the verifier can check it and emit one token more."""
        drafts, z_H, z_L = [], [], []
        x = y
        for i in range(K + 1):
            if self.drafter is not None:
                logits = self.drafter(x)
            else:
                logits, h, l_ = self.run(self.draft_pass, x, self.cache[:self.split])
                self.advance(1)
                z_H.append(h.reshape(h.shape[0], -1))
                z_L.append(l_.reshape(l_.shape[0], -1))
            if i < K:
                x = sample(logits)[0]
                drafts.append(x)
        if self.drafter is not None:
            return drafts, None, None
        self.rewind(K + 1)
        return drafts, mx.stack(z_H, axis=1), mx.stack(z_L, axis=1)
