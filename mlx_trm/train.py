"""Train a recursive LM from a YAML config: ``mlx_trm.train --config configs/X.yaml [k=v ...]``.

The step is the reference's (seed-reference.md §8, §9): one ACT step per optimizer step with a
persistent carry, loss = (Σ per-row mean CE + 0.5 q-halt BCE + MoE entropy reg) / global batch,
clip to 1.0, expert-bias update, AdamW, selector renorm, warmup + cosine on the 1-based step.
``train.act_warmup_percent`` (not in the reference, 0 by default) runs the first steps of an
ACT model with one ACT step per batch before the carry takes over.

Run directory (``out_dir``): ``metrics.jsonl`` (one JSON object per log line and evaluation),
``config.yaml`` (the resolved config) and ``model/`` (the latest checkpoint, a model directory
with ``train_state/`` for ``train.resume=true``; written atomically).
Data parallel: ``mlx.launch -n 2 --backend ring -m mlx_trm.train --config ...`` splits every
global batch across ranks and sums the gradients; rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .blas import warn_if_slow_blas
from .checkpoint import load_weights_strict, save, write_json_atomic
from .config import Config, ConfigError, TrainConfig, cli_errors, load_config
from .evaluate import COLLAPSE_NOTE, COLLAPSED_SPREAD
from .memory import fit_memory
from .models import Model, act_loss, act_step, build_model, initial_carry
from .models.moe import expert_counts, moe_entropy_reg, renorm_selectors, update_expert_bias

MODEL_SUBDIR = "model"
TRAIN_STATE = "train_state"


# ---------------------------------------------------------------------------------- schedule


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
    per step the split costs one extra graph launch. Both are compiled with the model and the
    optimizer state captured; ACT exploration draws from the ``key`` argument.
    ``halt_max_steps`` overrides the model's (1 for the ACT warm-up).
    """
    moe = model.args.use_moeut
    scale = 1.0 / tc.global_batch_size
    distributed = world is not None and world.size() > 1

    def loss_fn(carry, inputs, labels, key, step_rows):
        record = [] if moe else None
        carry, outputs = act_step(model, carry, inputs, labels, training=True, record=record,
                                  key=key, halt_max_steps=halt_max_steps)
        total, metrics = act_loss(outputs, carry["labels"])
        counts = {}
        if moe:
            # The regulariser is a mean over the step's rows: a micro-batch (or a rank) adds
            # its share, so the step's sum is the reference's full-batch value.
            reg = moe_entropy_reg(record) * (inputs.shape[0] / step_rows)
            total = total + reg
            metrics["moe_reg"] = reg
            counts = expert_counts(record, model)
        metrics["total"] = total
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
        if moe:
            update_expert_bias(model, counts)
        optimizer.update(model, grads)
        if moe:
            renorm_selectors(model)
        return grad_norm

    if not compile:
        return grad_step, apply_update
    state = [model.state, optimizer.state]  # randomness comes in as explicit keys
    return (mx.compile(grad_step, inputs=state, outputs=state),
            mx.compile(apply_update, inputs=state, outputs=state))


def train_step(step_fns, carry: dict, inputs: mx.array, labels: mx.array, accum: int,
               key: mx.array, ranks: int = 1) -> tuple[dict, dict, mx.array]:
    """One optimizer step over this rank's batch, split into ``accum`` micro-batches.

    ``key`` drives ACT exploration; a key per (seed, step, rank) makes a resumed run draw what
    the uninterrupted run drew.
    """
    grad_step, apply_update = step_fns
    step_rows = inputs.shape[0] * ranks
    if accum == 1:
        carry, metrics, counts, grads = grad_step(carry, inputs, labels, key, step_rows)
        return carry, metrics, apply_update(grads, counts)
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
    return carry, metrics, apply_update(grads, counts)


# ---------------------------------------------------------------------------------- evaluation


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
            carry, outputs = act_step(model, carry, inputs, labels, training=False)
            total, metrics = act_loss(outputs, carry["labels"])
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


# ---------------------------------------------------------------------------------- checkpoints


def save_checkpoint(out_dir: Path, model: Model, tokenizer: Any, optimizer: optim.Optimizer,
                    carry: dict, state: dict, config: Config) -> Path:
    """The latest checkpoint: a model directory plus ``train_state/`` to resume exactly."""

    def write_train_state(dir: Path) -> None:
        ts = dir / TRAIN_STATE
        ts.mkdir()
        mx.save_safetensors(str(ts / "optimizer.safetensors"),
                            dict(tree_flatten(optimizer.state)))
        mx.save_safetensors(str(ts / "carry.safetensors"), carry)
        write_json_atomic(ts / "state.json", {**state, "config": config.to_dict()})

    return save(out_dir / MODEL_SUBDIR, model, tokenizer, extra_files=write_train_state)


def load_train_state(model_dir: Path, model: Model, optimizer: optim.Optimizer
                     ) -> tuple[dict, dict]:
    """Restore weights, optimizer state and carry from a checkpoint; returns (state, carry)."""
    ts = model_dir / TRAIN_STATE
    if not (ts / "state.json").is_file():
        raise ConfigError(f"{model_dir} has no {TRAIN_STATE}/ to resume from; start a new run "
                          "(train.resume=false) or point out_dir at the run to continue")
    load_weights_strict(model, mx.load(str(model_dir / "model.safetensors")), str(model_dir))
    optimizer.state = tree_unflatten(list(mx.load(str(ts / "optimizer.safetensors")).items()))
    carry = mx.load(str(ts / "carry.safetensors"))
    state = json.loads((ts / "state.json").read_text())
    state.pop("config", None)
    return state, carry


# ---------------------------------------------------------------------------------- the loop


class MetricsLog:
    """JSON lines in the run directory (rank 0 only), optionally mirrored to wandb."""

    def __init__(self, path: Path | None, wandb_run: Any = None):
        self.path, self.wandb = path, wandb_run

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record.get("step"))


def _init_wandb(config: Config) -> Any:
    if not config.train.wandb:
        return None
    try:
        import wandb
    except ImportError:
        print("warning: train.wandb=true but wandb is not installed (pip install wandb); "
              "logging to metrics.jsonl only", file=sys.stderr)
        return None
    return wandb.init(project=config.train.wandb_project, config=config.to_dict(),
                      name=Path(config.out_dir).name)


# Settings that do not change the trained weights: a resumed run may change them.
NOT_TRAINING = {"resume", "eval_interval_sequences", "eval_batches", "log_interval",
                "checkpoint_interval_sequences", "compile", "checkpoint_activations", "wandb",
                "wandb_project"}


def check_same_training(out_dir: Path, config: Config) -> None:
    """Refuse to continue a run with other model or training settings: the result would be
    neither run (a changed lr or ``max_steps`` silently bends the schedule mid-run)."""
    if not (out_dir / "config.yaml").is_file():
        return
    saved = load_config(out_dir / "config.yaml").to_dict()  # older runs: new fields' defaults
    wanted = config.to_dict()
    differ = [f"{section}.{key}: {saved[section].get(key)} vs {value}"
              for section in ("model", "train") for key, value in wanted[section].items()
              if key not in NOT_TRAINING and saved[section].get(key) != value]
    if differ:
        raise ConfigError(f"{out_dir} was trained with other settings ({'; '.join(differ)}); "
                          "resume it with its own settings (its config.yaml) or choose "
                          "another out_dir")


def train(config: Config, *, quiet: bool = False, max_steps: int | None = None) -> Path:
    """Run (or resume) training as ``config`` says; returns the checkpoint directory.

    ``max_steps`` stops early (the schedule still follows the config): used to simulate an
    interruption in tests.
    """
    from .data import load_split, stream_batches
    from .progress import TrainProgress
    from .tokenizer import load_tokenizer

    tc, mc, dc = config.train, config.model, config.data
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    if tc.global_batch_size % size:
        raise ConfigError(f"train.global_batch_size {tc.global_batch_size} is not divisible by "
                          f"the {size} ranks; choose a multiple of {size}")
    if (tc.global_batch_size // size) % tc.grad_accum_steps:
        raise ConfigError(f"the per-rank batch {tc.global_batch_size // size} is not divisible "
                          f"by train.grad_accum_steps {tc.grad_accum_steps}")
    out_dir = Path(config.out_dir)
    model_dir = out_dir / MODEL_SUBDIR
    if (model_dir / TRAIN_STATE).exists():
        if not tc.resume:
            raise ConfigError(f"{out_dir} already holds a run; continue it with train.resume=true "
                              "or choose another out_dir")
        check_same_training(out_dir, config)
    leader = rank == 0
    say = (lambda *a: print(*a, file=sys.stderr)) if leader and not quiet else (lambda *a: None)
    if leader:
        warn_if_slow_blas()

    # Data first: bad paths fail before any model work.
    tokenizer = load_tokenizer(dc.tokenizer)
    if tokenizer.vocab_size > mc.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
                          f"{mc.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
    train_data = load_split(dc, "train", tokenizer)
    valid_data = load_split(dc, "validation", tokenizer) if tc.eval_interval_sequences else None

    mx.random.seed(tc.seed)
    model = build_model(mc)
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    n_steps = total_steps(tc)
    state = {"step": 0, "sequences_seen": 0, "epoch": 1, "batch_index": -1, "elapsed": 0.0}
    carry = None
    if tc.resume and (model_dir / TRAIN_STATE).exists():
        state, carry = load_train_state(model_dir, model, optimizer)
        say(f"resuming {model_dir} at step {state['step']}")
        if state["step"] >= n_steps:  # nothing to train: leave the run exactly as it is
            say(f"{model_dir} already finished all {n_steps} steps")
            return model_dir
    elif tc.resume:
        say(f"train.resume=true but {model_dir} holds no checkpoint: starting a new run")
    mx.eval(model.parameters(), optimizer.state)

    if leader:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    log = MetricsLog(out_dir / "metrics.jsonl" if leader else None,
                     _init_wandb(config) if leader else None)
    fit_memory(model, config, size, warn=leader)  # activation checkpointing, or a warning
    step_fns = make_step_functions(model, optimizer, tc, world, compile=tc.compile)
    # ACT warm-up: the first steps run one ACT step per batch, like a model without ACT, so
    # the latents learn to carry the input before the carry can pin them to one vector.
    act_warmup = int(tc.act_warmup_percent * n_steps) if mc.halt_max_steps > 1 else 0
    warmup_fns = make_step_functions(model, optimizer, tc, world, compile=tc.compile,
                                     halt_max_steps=1) if act_warmup else None
    eval_fn = make_eval_fn(model, compile=tc.compile)
    seq_len = mc.seq_len
    eval_set = None
    if valid_data is not None:
        from .data import eval_batches

        eval_set = [(x[rank::size], y[rank::size]) for x, y in
                    eval_batches(valid_data, tc.global_batch_size, seq_len, tc.eval_batches,
                                 seed=tc.seed, max_sequences=tc.max_sequences)]

    evaluated: dict[int, dict] = {}

    def run_eval(step: int) -> dict:
        if step in evaluated:  # the last periodic evaluation may fall on the final step
            return evaluated[step]
        result = evaluated[step] = evaluate_batches(eval_fn, eval_set, world)
        record = {"step": step, "sequences": state["sequences_seen"], "split": "validation",
                  **{f"val_{k}": v for k, v in result.items()}}
        log.write(record)
        return result

    batches = stream_batches(train_data, tc.global_batch_size, seq_len, seed=tc.seed,
                             start_epoch=state["epoch"], start_batch=state["batch_index"] + 1,
                             max_sequences=tc.max_sequences, packing=dc.packing,
                             drop_remainder=size > 1)
    last_eval = state["sequences_seen"] // tc.eval_interval_sequences if (
        tc.eval_interval_sequences) else 0
    last_ckpt = state["sequences_seen"] // tc.checkpoint_interval_sequences if (
        tc.checkpoint_interval_sequences) else 0
    stop_at = min(n_steps, max_steps) if max_steps else n_steps
    interrupted = False
    warned_collapse = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    mx.reset_peak_memory()  # the logged peak is this run's, not the process's so far
    progress = TrainProgress(stop_at, state["step"], enabled=leader and not quiet)
    tokens_per_step = tc.global_batch_size * seq_len
    window_start, window_steps = time.perf_counter(), 0
    if state["step"] == 0 and eval_set is not None:
        result = run_eval(0)
        say(f"step 0: val token CE {result['token_ce']:.4f}, ppl {result['perplexity']:.1f}")
    try:
        with progress:
            while state["step"] < stop_at and not interrupted:
                epoch, index, inputs, labels = next(batches)
                inputs = mx.array(inputs[rank::size] if size > 1 else inputs)
                labels = mx.array(labels[rank::size] if size > 1 else labels)
                if carry is None or carry["inputs"].shape != inputs.shape:
                    carry = initial_carry(model, *inputs.shape)  # new or changed batch size
                step = state["step"] + 1
                optimizer.learning_rate = learning_rate(step, tc, n_steps)
                t0 = time.perf_counter()
                key = mx.random.key((tc.seed * 1_000_003 + step) * 1009 + rank)
                fns = warmup_fns if step <= act_warmup else step_fns
                if step == act_warmup + 1 and act_warmup:
                    progress.note(f"step {step}: ACT warm-up done, training with "
                                  f"halt_max_steps={mc.halt_max_steps} from here")
                carry, metrics, grad_norm = train_step(fns, carry, inputs, labels,
                                                       tc.grad_accum_steps, key, size)
                if size > 1:  # log the global batch's numbers, not this rank's slice
                    metrics = tree_map(mx.distributed.all_sum, metrics)
                mx.eval(carry, metrics, grad_norm, model.state, optimizer.state)
                rows = tc.global_batch_size if size > 1 else inputs.shape[0]
                loss = float(metrics["total"]) / rows
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} at step {step}; the last good checkpoint in "
                        f"{model_dir} is intact (lower train.lr or check the data)")
                state.update(step=step, epoch=epoch, batch_index=index,
                             sequences_seen=state["sequences_seen"] + tc.global_batch_size,
                             elapsed=state["elapsed"] + time.perf_counter() - t0)
                window_steps += 1
                if step % tc.log_interval == 0 or step == stop_at:
                    now = time.perf_counter()
                    record = {
                        "step": step, "sequences": state["sequences_seen"],
                        "loss": loss,
                        "lm_loss": float(metrics["lm_loss"]) / rows,
                        "q_halt_loss": float(metrics["q_halt_loss"]) / rows,
                        "lr": float(optimizer.learning_rate), "grad_norm": float(grad_norm),
                        "tokens_per_sec": tokens_per_step * window_steps / (now - window_start),
                        "peak_memory_gb": mx.get_peak_memory() / 1e9,
                    }
                    if "moe_reg" in metrics:
                        record["moe_reg"] = float(metrics["moe_reg"])
                    log.write(record)
                    progress.update(step, record)
                    window_start, window_steps = now, 0
                else:
                    progress.update(step, None)
                seen = state["sequences_seen"]
                if tc.eval_interval_sequences and seen // tc.eval_interval_sequences > last_eval:
                    last_eval = seen // tc.eval_interval_sequences
                    result = run_eval(step)
                    progress.note(f"step {step}: val token CE {result['token_ce']:.4f}, "
                                  f"ppl {result['perplexity']:.1f}")
                    if result["latent_spread"] < COLLAPSED_SPREAD and not warned_collapse:
                        warned_collapse = True
                        progress.note(f"step {step}: latent spread "
                                      f"{result['latent_spread']:.1e}. {COLLAPSE_NOTE}")
                if (tc.checkpoint_interval_sequences
                        and seen // tc.checkpoint_interval_sequences > last_ckpt):
                    last_ckpt = seen // tc.checkpoint_interval_sequences
                    if leader:
                        save_checkpoint(out_dir, model, tokenizer, optimizer, carry, state, config)
    finally:
        signal.signal(signal.SIGINT, previous_handler)

    if leader:
        save_checkpoint(out_dir, model, tokenizer, optimizer, carry, state, config)
    if interrupted:
        say(f"interrupted at step {state['step']}: saved {model_dir}; resume with "
            f"train.resume=true")
        raise SystemExit(130)
    if eval_set is not None and state["step"] >= stop_at and state["step"] not in evaluated:
        result = run_eval(state["step"])
        say(f"final: val token CE {result['token_ce']:.4f}, ppl {result['perplexity']:.1f}")
    say(f"saved {model_dir}")
    return model_dir


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mlx_trm.train", description="Train a tiny recursive language model.",
        epilog="Overrides: section.key=value, e.g. train.max_steps=200 data.path=stories.txt "
               "out_dir=runs/x train.resume=true")
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    try:
        train(config, quiet=args.quiet)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
