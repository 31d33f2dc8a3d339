"""Held-out loss of a model: the evaluation of ``mlx_trm.train`` and ``mlx_trm.evaluate``.

The model runs as at inference (fresh carry, ``halt_max_steps`` ACT steps) and is scored with
the training step's loss (:func:`mlx_trm.models.step_loss`); each story is one row as in training
(end-of-story and padding masked), so the first token of each story is context, never a target.
Bits per byte divide the summed cross-entropy (in bits) by the UTF-8 bytes of the predicted
tokens' text. :func:`evaluate_adaptive` scores the same batches under generation's per-token
halting (``mlx_trm.evaluate --adaptive-halt``).
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np
from rich.progress import Progress

from ..data.batches import iterate_batches, load_eval_tokens, num_batches
from ..generation.adaptive import HaltPolicy, adaptive_forward
from ..models import Model, act_loss, initial_carry, step_loss


def predicted_bytes(tokenizer: Any, labels: np.ndarray) -> int:
    """UTF-8 bytes of the text behind the label tokens of a batch (masked ones excluded)."""
    total = 0
    for row in labels:
        ids = row[row >= 0].tolist()
        total += len(tokenizer.decode(ids).encode("utf-8"))
    return total


# Below this latent spread every position reads out nearly the same z_H (healthy models: > 0.1).
COLLAPSED_SPREAD = 1e-3
COLLAPSE_NOTE = ("note: the latents have collapsed: every position reads out nearly the same "
                 "z_H, so the model predicts one distribution everywhere (the unigram plateau). "
                 "TRMs without ACT often pass through this early and recover; ACT runs on small "
                 "budgets stay there unless they start with train.act_warmup_percent=0.5 "
                 "(benchmarks/results/README.md)")


def make_eval_fn(model: Model, compile: bool = True):
    """Evaluate one batch exactly as inference does (fresh carry, ``halt_max_steps`` steps).

    Returns sums: the reference's eval loss (mean over ACT steps of total / B, q-halt BCE
    included), the last step's token cross-entropy, token count and correct predictions, and
    the latent spread: the share of the final z_H's variance that varies across positions and
    rows. It falls to ~0 when a TRM collapses onto one read-out vector for every position (the
    unigram plateau), long before the loss says why it stopped falling.
    """

    def eval_batch(inputs, labels):
        B, T = inputs.shape
        carry = initial_carry(model, B, T)
        reference_loss = mx.array(0.0)
        for _ in range(model.args.halt_max_steps):
            carry, total, metrics = step_loss(model, carry, inputs, labels)
            reference_loss = reference_loss + total / B
        reference_loss = reference_loss / model.args.halt_max_steps
        z_H = carry["z_H"]
        spread = mx.mean(mx.square(z_H - z_H.mean(axis=(0, 1)))) / mx.mean(mx.square(z_H))
        return (reference_loss, metrics["token_ce_sum"], metrics["n_tokens"], metrics["correct"],
                spread)

    return mx.compile(eval_batch, inputs=model.state) if compile else eval_batch


def evaluate_batches(eval_fn, batches, world: Any = None) -> dict[str, float]:
    """Aggregate over batches (and over ranks, each holding a slice of every batch)."""
    sums = np.zeros(6)  # reference loss * rows, CE sum, tokens, correct, rows, spread * rows
    for inputs, labels in batches:
        ref, ce, n, correct, spread = eval_fn(mx.array(inputs), mx.array(labels))
        rows = inputs.shape[0]
        values = mx.stack([ref * rows, ce, n.astype(mx.float32), correct.astype(mx.float32),
                           mx.array(float(rows)), spread * rows])
        if world is not None and world.size() > 1:
            values = mx.distributed.all_sum(values)
        sums += np.array(values, dtype=np.float64)
    token_ce = sums[1] / max(sums[2], 1.0)
    return {
        "token_ce": float(token_ce),
        "perplexity": float(math.exp(min(token_ce, 50.0))),
        "accuracy": float(sums[3] / max(sums[2], 1.0)),
        "reference_eval_loss": float(sums[0] / max(sums[4], 1.0)),
        "latent_spread": float(sums[5] / max(sums[4], 1.0)),
        "tokens": int(sums[2]),
    }


def evaluate_model(model: Any, tokenizer: Any, data: str, *, split: str = "validation",
                   batch_size: int = 16, seq_len: int | None = None,
                   max_stories: int | None = None, text_field: str = "text",
                   progress: bool = True) -> dict[str, float]:
    seq_len = seq_len or model.args.seq_len
    dataset = load_eval_tokens(data, tokenizer, split, text_field=text_field,
                               max_stories=max_stories)
    n_bytes = 0
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("evaluate", total=num_batches(dataset, batch_size, seq_len))

        def batches():  # counts the predicted bytes and advances the bar on the way
            nonlocal n_bytes
            # a fixed order (epoch 1 of seed 42) so repeated runs see the same batches
            for inputs, labels in iterate_batches(dataset, batch_size, seq_len):
                n_bytes += predicted_bytes(tokenizer, labels)
                yield inputs, labels
                bar.advance(task)

        result = evaluate_batches(make_eval_fn(model), batches())
    ce_sum = result["token_ce"] * result["tokens"]
    return {
        "stories": dataset.n_stories,
        "tokens": result["tokens"],
        "token_ce": result["token_ce"],
        "perplexity": result["perplexity"],
        "bits_per_byte": ce_sum / math.log(2) / max(n_bytes, 1),
        "accuracy": result["accuracy"],
        "latent_spread": result["latent_spread"],
    }


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
