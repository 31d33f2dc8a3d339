"""The optimizer step of the training loop and its schedule, as the reference defines them.

One ACT step per optimizer step with a persistent carry (rows that halt adopt the next batch's
rows); loss = ``models.step_loss`` (sum of per-row mean token CE + 0.5 q-halt BCE + MoE entropy
regulariser) / global batch; gradients clipped to norm 1.0; then the MoE expert-bias update,
AdamW (torch semantics), the selector renorm; linear warmup + cosine decay on the 1-based step.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..config import TrainConfig
from ..models import Model, step_loss
from ..models.router import routers


def total_steps(tc: TrainConfig) -> int:
    return tc.max_steps or math.ceil(tc.max_sequences / tc.global_batch_size)


def learning_rate(step: int, tc: TrainConfig, n_steps: int) -> float:
    """Linear warmup then cosine to ``lr * lr_min_ratio``; ``step`` is 1-based as the reference."""
    warmup = int(tc.lr_warmup_percent * n_steps)
    if step < warmup:
        return tc.lr * step / warmup
    progress = (step - warmup) / max(1, n_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return tc.lr * (tc.lr_min_ratio + (1.0 - tc.lr_min_ratio) * cosine)


def make_optimizer(tc: TrainConfig) -> optim.AdamW:
    # torch.optim.AdamW semantics: bias-corrected, eps 1e-8 (MLX defaults differ).
    return optim.AdamW(learning_rate=tc.lr, betas=[tc.beta1, tc.beta2], eps=1e-8,
                       weight_decay=tc.weight_decay, bias_correction=True)


# ---------------------------------------------------------------------------------- the step


def make_step_functions(model: Model, optimizer: optim.Optimizer, tc: TrainConfig,
                        world: Any = None, compile: bool = True,
                        halt_max_steps: int | None = None):
    """Two functions: ``grad_step`` (forward + backward of one micro-batch) and ``apply_update``.

    Splitting them lets a global batch be accumulated over micro-batches; with one micro-batch
    per step the split costs one extra graph launch. ``apply_update`` returns the gradient norm
    and whether it and every updated weight are finite. Both are compiled with the model and the
    optimizer state captured; ACT exploration draws from the ``key`` argument.
    ``halt_max_steps`` overrides the model's (1 for the ACT warm-up).
    """
    moe_routers = routers(model)
    scale = 1.0 / tc.global_batch_size
    distributed = world is not None and world.size() > 1

    def loss_fn(carry, inputs, labels, key, step_rows):
        # the MoE regulariser is a mean over the step's rows: a micro-batch (or a rank) adds
        # its share, so the step's sum is the reference's full-batch value
        carry, total, metrics = step_loss(model, carry, inputs, labels, training=True, key=key,
                                          halt_max_steps=halt_max_steps,
                                          reg_share=inputs.shape[0] / step_rows)
        counts = metrics.pop("expert_counts", [])
        return total * scale, (carry, metrics, counts)

    value_and_grad = nn.value_and_grad(model, loss_fn)

    def grad_step(carry, inputs, labels, key, step_rows):
        (_, (carry, metrics, counts)), grads = value_and_grad(carry, inputs, labels, key,
                                                              step_rows)
        return carry, metrics, counts, grads

    def apply_update(grads, counts):
        if distributed:  # the loss is already divided by the global batch: sum, not average
            grads = tree_map(lambda g: mx.distributed.all_sum(g), grads)
            counts = tree_map(lambda c: mx.distributed.all_sum(c), counts)
        grads, grad_norm = optim.clip_grad_norm(grads, tc.grad_clip_norm)
        for router, count in zip(moe_routers, counts, strict=True):
            router.update_bias(count)
        optimizer.update(model, grads)
        for router in moe_routers:
            router.renorm()
        # one flag, fused into the step: is the update (and every weight it made) finite?
        finite = mx.isfinite(grad_norm)
        for _, value in tree_flatten(model.parameters()):
            finite = finite & mx.all(mx.isfinite(value))
        return grad_norm, finite

    if not compile:
        return grad_step, apply_update
    state = [model.state, optimizer.state]  # randomness comes in as explicit keys
    return (mx.compile(grad_step, inputs=state, outputs=state),
            mx.compile(apply_update, inputs=state, outputs=state))


def train_step(step_fns, carry: dict, inputs: mx.array, labels: mx.array, accum: int,
               key: mx.array, ranks: int = 1) -> tuple[dict, dict, mx.array]:
    """One optimizer step over this rank's batch, split into ``accum`` micro-batches.

    ``key`` drives ACT exploration; a key per (seed, step, rank) makes a resumed run draw what
    the uninterrupted run drew. ``metrics["finite"]`` is False when the step made a gradient
    or a weight non-finite (the loss in ``metrics`` was computed before the update).
    """
    grad_step, apply_update = step_fns
    step_rows = inputs.shape[0] * ranks
    if accum == 1:
        carry, metrics, counts, grads = grad_step(carry, inputs, labels, key, step_rows)
        grad_norm, metrics["finite"] = apply_update(grads, counts)
        return carry, metrics, grad_norm
    bounds = np.linspace(0, inputs.shape[0], accum + 1).astype(int)
    carries, metrics, counts, grads = [], None, None, None
    keys = mx.random.split(key, accum)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi == lo:
            continue
        part = {k: v[lo:hi] for k, v in carry.items()}
        c, m, n, g = grad_step(part, inputs[lo:hi], labels[lo:hi], keys[i], step_rows)
        carries.append(c)
        add = lambda a, b: a + b
        metrics = m if metrics is None else tree_map(add, metrics, m)
        counts = n if counts is None else tree_map(add, counts, n)
        grads = g if grads is None else tree_map(add, grads, g)
    carry = {k: mx.concatenate([c[k] for c in carries]) for k in carry}
    grad_norm, metrics["finite"] = apply_update(grads, counts)
    return carry, metrics, grad_norm


