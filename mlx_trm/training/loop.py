"""The training loop: ``train(model, optimizer, batches, evaluate, args, callbacks)``.

It is handed ready objects: the model and its optimizer (restored by the caller when resuming,
with the ``state`` and ``carry`` of the checkpoint), the global batches ``(epoch, index, inputs,
labels)`` from where that state stopped, an ``evaluate`` function (or None) and the training
settings ``args`` (a :class:`~mlx_trm.config.TrainConfig`). It knows no files and no display:
what it has to report goes to ``callbacks`` (:class:`TrainingCallback`), which also write the
checkpoints and may stop it early. ``mlx_trm.train`` builds all of it from a YAML config.

Each step: lr -> step -> stop if not finite -> report -> evaluate and save when due.
Evaluation and checkpoints follow the sequences seen, as the reference. Nothing of a step whose
loss, gradient norm or updated weights are not finite is reported or saved. ``act_warmup_percent``
(0 by default) runs the first steps of an ACT model with one ACT step per batch. Data parallel
(``mlx.launch``): each rank trains on its rows of every global batch, the gradients are summed,
and every rank reports the global batch's numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..config import TrainConfig
from ..models import Model, initial_carry
from .step import learning_rate, make_step_functions, total_steps, train_step


class TrainingCallback:
    """What the loop reports, and asks: subclass and override (these do nothing)."""

    def on_step(self, step: int, report: dict | None) -> None:
        """After every step; ``report`` (loss, lr, tokens/s, ...) on the logged ones."""

    def on_eval(self, step: int, sequences: int, result: dict) -> None:
        """After an evaluation (at step 0 for the one before training), with the sequences
        trained on so far."""

    def on_note(self, message: str) -> None:
        """Something worth a line (the end of the ACT warm-up)."""

    def save(self, carry: dict, state: dict) -> None:
        """Write a checkpoint: the model and optimizer as they are, this carry and state."""

    def should_stop(self) -> bool:
        """Stop after the current step (and save)."""
        return False


def new_state() -> dict[str, Any]:
    """Where a new run starts: what a checkpoint's ``state.json`` records of the loop."""
    return {"step": 0, "sequences_seen": 0, "epoch": 1, "batch_index": -1, "elapsed": 0.0}


def due(interval: int | None, before: int, after: int) -> bool:
    """Whether a job every ``interval`` sequences falls between ``before`` and ``after``."""
    return bool(interval) and after // interval > before // interval


def check_finite(step: int, loss: float, finite: bool) -> None:
    """Stop before anything of a step that went non-finite is reported or saved."""
    if math.isfinite(loss) and finite:
        return
    what = (f"the loss became {loss}" if not math.isfinite(loss)
            else "the update made the gradient norm or the weights non-finite")
    raise FloatingPointError(f"{what} at step {step}; nothing of it was written")


def step_report(state: dict, metrics: dict, grad_norm: mx.array, rows: int, lr: float,
                tokens_per_sec: float) -> dict:
    report = {
        "step": state["step"], "sequences": state["sequences_seen"],
        "loss": float(metrics["total"]) / rows,
        "lm_loss": float(metrics["lm_loss"]) / rows,
        "q_halt_loss": float(metrics["q_halt_loss"]) / rows,
        "lr": lr, "grad_norm": float(grad_norm),
        "tokens_per_sec": tokens_per_sec, "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
    if "moe_reg" in metrics:
        report["moe_reg"] = float(metrics["moe_reg"])
    return report


def step_functions(model: Model, optimizer: optim.Optimizer, args: TrainConfig, world: Any,
                   n_steps: int) -> tuple[tuple, tuple | None, int]:
    """(the step's functions, the ACT warm-up's, the warm-up's steps). The warm-up runs one
    ACT step per batch, so the latents learn to carry the input before the carry can pin them
    to one vector."""
    act_warmup = int(args.act_warmup_percent * n_steps) if model.args.halt_max_steps > 1 else 0
    step_fns = make_step_functions(model, optimizer, args, world, compile=args.compile)
    if not act_warmup:
        return step_fns, None, 0
    return step_fns, make_step_functions(model, optimizer, args, world, compile=args.compile,
                                         halt_max_steps=1), act_warmup


def train(model: Model, optimizer: optim.Optimizer, batches: Iterator,
          evaluate: Callable[[], dict] | None, args: TrainConfig,
          callbacks: TrainingCallback | None = None, *, state: dict | None = None,
          carry: dict | None = None, stop_at: int | None = None) -> dict:
    """Step until ``stop_at`` (default: the end of the schedule) or ``callbacks.should_stop()``,
    then save and, at ``stop_at``, evaluate; returns the state reached. ``stop_at`` stops early
    without changing the schedule (the tests' interruptions)."""
    callbacks = callbacks or TrainingCallback()
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    n_steps = total_steps(args)
    stop_at = min(stop_at or n_steps, n_steps)
    state = dict(state or new_state())
    saved = state["step"] if carry is not None else None
    step_fns, warmup_fns, act_warmup = step_functions(model, optimizer, args, world, n_steps)
    evaluated: set[int] = set()

    def evaluate_at(step: int) -> None:  # the last periodic one may fall on the final step
        if evaluate is not None and step not in evaluated:
            evaluated.add(step)
            callbacks.on_eval(step, state["sequences_seen"], evaluate())

    def save() -> None:  # unless the checkpoint holds this step or nothing was trained yet
        nonlocal saved
        if state["step"] != saved and carry is not None:
            callbacks.save(carry, state)
            saved = state["step"]

    mx.reset_peak_memory()  # the reported peak is this run's, not the process's so far
    window_start, window_steps = time.perf_counter(), 0
    if state["step"] == 0:
        evaluate_at(0)
    while state["step"] < stop_at and not callbacks.should_stop():
        epoch, index, inputs, labels = next(batches)
        inputs = mx.array(inputs[rank::size] if size > 1 else inputs)
        labels = mx.array(labels[rank::size] if size > 1 else labels)
        if carry is None or carry["inputs"].shape != inputs.shape:
            carry = initial_carry(model, *inputs.shape)  # new, or another batch size
        step = state["step"] + 1
        optimizer.learning_rate = learning_rate(step, args, n_steps)
        if step == act_warmup + 1 and act_warmup:
            callbacks.on_note(f"step {step}: ACT warm-up done, training with "
                              f"halt_max_steps={model.args.halt_max_steps} from here")

        t0 = time.perf_counter()
        key = mx.random.key((args.seed * 1_000_003 + step) * 1009 + rank)
        fns = warmup_fns if step <= act_warmup else step_fns
        new_carry, metrics, grad_norm = train_step(fns, carry, inputs, labels,
                                                   args.grad_accum_steps, key, size)
        finite = metrics.pop("finite")  # the same on every rank: the weights are
        if size > 1:  # report the global batch's numbers, not this rank's slice
            metrics = tree_map(mx.distributed.all_sum, metrics)
        mx.eval(new_carry, metrics, grad_norm, finite, model.state, optimizer.state)
        rows = args.global_batch_size if size > 1 else inputs.shape[0]
        check_finite(step, float(metrics["total"]) / rows, bool(finite))

        carry, seen = new_carry, state["sequences_seen"]
        state.update(step=step, epoch=epoch, batch_index=index,
                     sequences_seen=seen + args.global_batch_size,
                     elapsed=state["elapsed"] + time.perf_counter() - t0)
        window_steps += 1
        report = None
        if step % args.log_interval == 0 or step == stop_at:
            now = time.perf_counter()
            tps = args.global_batch_size * inputs.shape[1] * window_steps / (now - window_start)
            report = step_report(state, metrics, grad_norm, rows,
                                 float(optimizer.learning_rate), tps)
            window_start, window_steps = now, 0
        callbacks.on_step(step, report)
        if due(args.eval_interval_sequences, seen, state["sequences_seen"]):
            evaluate_at(step)
        if due(args.checkpoint_interval_sequences, seen, state["sequences_seen"]):
            save()
    save()
    if state["step"] >= stop_at and not callbacks.should_stop():
        evaluate_at(state["step"])
    return state
