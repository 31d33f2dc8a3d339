"""Adaptive recursion per token on the command line and in evaluation.

The halting rule and the adaptive decoder live in mlx_trm.generation.adaptive; this module holds
the held-out evaluation under a policy (:func:`evaluate_adaptive`, for ``mlx_trm.evaluate``) and
the ``--adaptive-halt`` flags that ``mlx_trm.generate``, ``mlx_trm.chat`` and ``mlx_trm.evaluate``
share.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np

from .config import ConfigError
from .data import iterate_batches, load_eval_tokens
from .generation.adaptive import HaltPolicy, adaptive_forward, halt_policy
from .models import act_loss


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
