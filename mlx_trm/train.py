"""Train a recursive LM from a YAML config: ``mlx_trm.train --config configs/X.yaml [k=v ...]``.

The step and its schedule are the reference's (``mlx_trm.step``). ``train.act_warmup_percent``
(not in the reference, 0 by default) runs the first steps of an ACT model with one ACT step per
batch before the carry takes over.

A run is built once (:func:`setup_run`: settings, resume decision, data, model, step functions,
evaluation set) and then driven by :func:`train_loop`. Its directory (``out_dir``) is described
in ``mlx_trm.run_dir``: a lock, ``model/`` (the latest checkpoint, replaced atomically),
``metrics.jsonl`` and ``config.yaml``. Nothing non-finite is ever written: a step whose loss,
gradient norm or updated weights are not finite stops the run before it is logged or saved.
Ctrl-C and SIGTERM stop after the current step and save.
Data parallel: ``mlx.launch -n 2 --backend ring -m mlx_trm.train --config ...`` splits every
global batch across ranks and sums the gradients; rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from .blas import prepare_cpu_backend
from .config import Config, ConfigError, TrainConfig, cli_errors, load_config
from .data import eval_batches, load_split, stream_batches
from .evaluation import COLLAPSE_NOTE, COLLAPSED_SPREAD, evaluate_batches, make_eval_fn
from .memory import fit_memory
from .models import Model, build_model, initial_carry
from .progress import TrainProgress
from .run_dir import (  # noqa: F401  (MODEL_SUBDIR, TRAIN_STATE: re-exported for scripts)
    METRICS_FILE,
    MODEL_SUBDIR,
    TRAIN_STATE,
    MetricsLog,
    RunLock,
    check_same_training,
    checkpoint_step,
    load_train_state,
    recover_checkpoint,
    save_checkpoint,
    trim_metrics,
    write_config_yaml,
)
from .step import (  # noqa: F401  (the step's home is mlx_trm.step; re-exported)
    learning_rate,
    make_optimizer,
    make_step_functions,
    total_steps,
    train_step,
)
from .tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """A training run's objects, built once by :func:`setup_run` and driven by the loop."""

    config: Config
    world: Any
    model: Model
    tokenizer: Any
    optimizer: optim.Optimizer
    step_fns: tuple
    warmup_fns: tuple | None  # the ACT warm-up's (one ACT step per batch), if it has one
    act_warmup: int
    eval_fn: Callable | None
    eval_set: list | None
    batches: Iterator
    state: dict
    carry: dict | None
    n_steps: int  # the schedule's length
    stop_at: int  # where this call stops (n_steps, or earlier in tests)
    log: MetricsLog
    say: Callable[..., None]  # progress messages (not with quiet)
    warn: Callable[..., None]  # what was repaired or dropped (always, on rank 0)
    quiet: bool
    saved_step: int | None = None  # the step the checkpoint on disk holds
    evaluated: dict[int, dict] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def model_dir(self) -> Path:
        return self.out_dir / MODEL_SUBDIR

    @property
    def leader(self) -> bool:
        return self.world.rank() == 0


def check_batch_split(tc: TrainConfig, ranks: int) -> None:
    if tc.global_batch_size % ranks:
        raise ConfigError(f"train.global_batch_size {tc.global_batch_size} is not divisible by "
                          f"the {ranks} ranks; choose a multiple of {ranks}")
    if (tc.global_batch_size // ranks) % tc.grad_accum_steps:
        raise ConfigError(f"the per-rank batch {tc.global_batch_size // ranks} is not divisible "
                          f"by train.grad_accum_steps {tc.grad_accum_steps}")


def decide_resume(config: Config, leader: bool, say: Callable[..., None]) -> dict:
    """Resume or start: recover an interrupted save, refuse to overwrite a run, refuse other
    settings; returns the settings a resume changes (evaluation and logging ones may)."""
    out_dir = Path(config.out_dir)
    model_dir = out_dir / MODEL_SUBDIR
    if leader:
        for note in recover_checkpoint(model_dir):
            say(f"{out_dir}: {note}")
    if not (model_dir / TRAIN_STATE).exists():
        if config.train.resume:
            say(f"train.resume=true but {model_dir} holds no checkpoint: starting a new run")
        return {}
    if not config.train.resume:
        raise ConfigError(f"{out_dir} already holds a run; continue it with train.resume=true "
                          "or choose another out_dir")
    return check_same_training(out_dir, config)


def setup_run(config: Config, *, quiet: bool = False, max_steps: int | None = None) -> Run:
    """Everything the loop needs; fails (one line) before any model work on bad settings."""
    tc, mc, dc = config.train, config.model, config.data
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    leader = rank == 0
    warn = (lambda *a: print(*a, file=sys.stderr)) if leader else (lambda *a: None)
    say = warn if not quiet else (lambda *a: None)
    changed = decide_resume(config, leader, warn)
    if leader:
        prepare_cpu_backend()

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
    state = {"step": 0, "sequences_seen": 0, "epoch": 1, "batch_index": -1, "elapsed": 0.0}
    carry = None
    out_dir, model_dir = Path(config.out_dir), Path(config.out_dir) / MODEL_SUBDIR
    if tc.resume and (model_dir / TRAIN_STATE).exists():
        state, carry = load_train_state(model_dir, model, optimizer)
    mx.eval(model.parameters(), optimizer.state)
    fit_memory(model, config, size, warn=leader)  # activation checkpointing, or a warning
    n_steps = total_steps(tc)
    # ACT warm-up: the first steps run one ACT step per batch, like a model without ACT, so
    # the latents learn to carry the input before the carry can pin them to one vector.
    act_warmup = int(tc.act_warmup_percent * n_steps) if mc.halt_max_steps > 1 else 0
    eval_set = None
    if valid_data is not None:
        eval_set = [(x[rank::size], y[rank::size]) for x, y in
                    eval_batches(valid_data, tc.global_batch_size, mc.seq_len, tc.eval_batches,
                                 seed=tc.seed, max_sequences=tc.max_sequences)]
    run = Run(
        config=config, world=world, model=model, tokenizer=tokenizer, optimizer=optimizer,
        step_fns=make_step_functions(model, optimizer, tc, world, compile=tc.compile),
        warmup_fns=make_step_functions(model, optimizer, tc, world, compile=tc.compile,
                                       halt_max_steps=1) if act_warmup else None,
        act_warmup=act_warmup,
        eval_fn=make_eval_fn(model, compile=tc.compile) if eval_set is not None else None,
        eval_set=eval_set,
        batches=stream_batches(train_data, tc.global_batch_size, mc.seq_len, seed=tc.seed,
                               start_epoch=state["epoch"], start_batch=state["batch_index"] + 1,
                               max_sequences=tc.max_sequences, packing=dc.packing,
                               drop_remainder=size > 1),
        state=state, carry=carry, n_steps=n_steps,
        stop_at=min(n_steps, max_steps) if max_steps else n_steps,
        log=MetricsLog(out_dir / METRICS_FILE if leader else None,
                       _init_wandb(config) if leader else None),
        say=say, warn=warn, quiet=quiet, saved_step=state["step"] if carry is not None else None)
    if carry is not None:
        say(f"resuming {model_dir} at step {state['step']}")
    if leader and state["step"] < n_steps:  # a finished run is left exactly as it is
        start_run_files(run, changed)
    return run


def start_run_files(run: Run, changed: dict) -> None:
    """config.yaml for a new run; metrics.jsonl trimmed to the checkpoint (and the resume
    noted, with the settings it changed) so no step is logged twice."""
    step = run.state["step"]
    write_config_yaml(run.out_dir, run.config, resuming=step > 0)
    if dropped := trim_metrics(run.out_dir / METRICS_FILE, step):
        run.warn(f"{run.out_dir}: dropped {dropped} metrics records past step {step} (the "
                "interrupted run's; they are logged again)")
    if step > 0:
        run.log.write({"step": step, "sequences": run.state["sequences_seen"], "resumed": True,
                       "changed": {k: list(v) for k, v in changed.items()}})


def _init_wandb(config: Config) -> Any:
    if not config.train.wandb:
        return None
    try:
        import wandb  # optional
    except ImportError:
        print("warning: train.wandb=true but wandb is not installed (pip install wandb); "
              "logging to metrics.jsonl only", file=sys.stderr)
        return None
    return wandb.init(project=config.train.wandb_project, config=config.to_dict(),
                      name=Path(config.out_dir).name)


# ---------------------------------------------------------------------------------- its pieces


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while the run was being set up (``signum`` says which)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (``timeout``, a batch scheduler, ``docker stop``).

    Until :meth:`defer` they interrupt at once (nothing is written yet); after it they only
    record the signal, and the loop stops after the current step and saves, so neither a step
    nor a checkpoint write is ever cut in half.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals need the main one
            self.previous = {s: signal.signal(s, self._interrupt) for s in self.SIGNALS}
        return self

    def defer(self) -> None:
        for s in self.previous:
            signal.signal(s, self._record)

    def _interrupt(self, signum: int, frame: Any) -> None:
        self.received = signum
        raise Interrupted(signum)

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def evaluate_now(run: Run, step: int, note: Callable[[str], None]) -> None:
    """Evaluate, log the record, and say so (with the collapse note the first time)."""
    if step in run.evaluated:  # the last periodic evaluation may fall on the final step
        return
    first_collapse = not any(r["latent_spread"] < COLLAPSED_SPREAD for r in run.evaluated.values())
    result = run.evaluated[step] = evaluate_batches(run.eval_fn, run.eval_set, run.world)
    run.log.write({"step": step, "sequences": run.state["sequences_seen"], "split": "validation",
                   **{f"val_{k}": v for k, v in result.items()}})
    label = "final" if step == run.stop_at and step > 0 else f"step {step}"
    note(f"{label}: val token CE {result['token_ce']:.4f}, ppl {result['perplexity']:.1f}")
    if result["latent_spread"] < COLLAPSED_SPREAD and first_collapse and step > 0:
        note(f"step {step}: latent spread {result['latent_spread']:.1e}. {COLLAPSE_NOTE}")


def save_now(run: Run) -> None:
    """Write the checkpoint (rank 0), unless the one on disk holds this step or nothing was
    trained yet."""
    if run.state["step"] == run.saved_step or run.carry is None:
        return
    if run.leader:
        save_checkpoint(run.out_dir, run.model, run.tokenizer, run.optimizer, run.carry,
                        run.state, run.config)
    run.saved_step = run.state["step"]


def due(interval: int | None, before: int, after: int) -> bool:
    """Whether a job every ``interval`` sequences falls between ``before`` and ``after``."""
    return bool(interval) and after // interval > before // interval


def stop_if_not_finite(run: Run, step: int, loss: float, finite: bool) -> None:
    """Stop before anything of a step that went non-finite is logged or saved."""
    if math.isfinite(loss) and finite:
        return
    what = (f"the loss became {loss}" if not math.isfinite(loss)
            else "the update made the gradient norm or the weights non-finite")
    kept = (f"{run.model_dir} holds the step-{run.saved_step} checkpoint, untouched"
            if run.saved_step is not None else "no checkpoint had been written yet")
    raise FloatingPointError(f"{what} at step {step}; nothing of it was written: {kept} "
                             "(lower train.lr in a new out_dir, or check the data)")


def step_record(run: Run, metrics: dict, grad_norm: mx.array, rows: int, tokens_per_sec: float
                ) -> dict:
    record = {
        "step": run.state["step"], "sequences": run.state["sequences_seen"],
        "loss": float(metrics["total"]) / rows,
        "lm_loss": float(metrics["lm_loss"]) / rows,
        "q_halt_loss": float(metrics["q_halt_loss"]) / rows,
        "lr": float(run.optimizer.learning_rate), "grad_norm": float(grad_norm),
        "tokens_per_sec": tokens_per_sec, "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
    if "moe_reg" in metrics:
        record["moe_reg"] = float(metrics["moe_reg"])
    return record


# ---------------------------------------------------------------------------------- the loop


def train_loop(run: Run, signals: StopSignals) -> None:
    """Step until ``run.stop_at`` or a stop signal: lr -> step -> check -> log -> evaluate and
    save when due. Evaluation and checkpoints follow the sequences seen, as the reference."""
    tc, seq_len = run.config.train, run.config.model.seq_len
    rank, size = run.world.rank(), run.world.size()
    state = run.state
    progress = TrainProgress(run.stop_at, state["step"], enabled=run.leader and not run.quiet)
    window_start, window_steps = time.perf_counter(), 0
    with progress:
        if state["step"] == 0 and run.eval_set is not None:
            evaluate_now(run, 0, progress.note)
        while state["step"] < run.stop_at and signals.received is None:
            epoch, index, inputs, labels = next(run.batches)
            inputs = mx.array(inputs[rank::size] if size > 1 else inputs)
            labels = mx.array(labels[rank::size] if size > 1 else labels)
            if run.carry is None or run.carry["inputs"].shape != inputs.shape:
                run.carry = initial_carry(run.model, *inputs.shape)  # new or other batch size
            step = state["step"] + 1
            run.optimizer.learning_rate = learning_rate(step, tc, run.n_steps)
            if step == run.act_warmup + 1 and run.act_warmup:
                progress.note(f"step {step}: ACT warm-up done, training with "
                              f"halt_max_steps={run.config.model.halt_max_steps} from here")

            t0 = time.perf_counter()
            key = mx.random.key((tc.seed * 1_000_003 + step) * 1009 + rank)
            fns = run.warmup_fns if step <= run.act_warmup else run.step_fns
            carry, metrics, grad_norm = train_step(fns, run.carry, inputs, labels,
                                                   tc.grad_accum_steps, key, size)
            finite = metrics.pop("finite")  # the same on every rank: the weights are
            if size > 1:  # log the global batch's numbers, not this rank's slice
                metrics = tree_map(mx.distributed.all_sum, metrics)
            mx.eval(carry, metrics, grad_norm, finite, run.model.state, run.optimizer.state)
            rows = tc.global_batch_size if size > 1 else inputs.shape[0]
            stop_if_not_finite(run, step, float(metrics["total"]) / rows, bool(finite))

            run.carry, seen = carry, state["sequences_seen"]
            state.update(step=step, epoch=epoch, batch_index=index,
                         sequences_seen=seen + tc.global_batch_size,
                         elapsed=state["elapsed"] + time.perf_counter() - t0)
            window_steps += 1
            if step % tc.log_interval == 0 or step == run.stop_at:
                now = time.perf_counter()
                tps = tc.global_batch_size * seq_len * window_steps / (now - window_start)
                record = step_record(run, metrics, grad_norm, rows, tps)
                run.log.write(record)
                progress.update(step, record)
                window_start, window_steps = now, 0
            else:
                progress.update(step, None)
            if run.eval_set is not None and due(tc.eval_interval_sequences, seen,
                                                state["sequences_seen"]):
                evaluate_now(run, step, progress.note)
            if due(tc.checkpoint_interval_sequences, seen, state["sequences_seen"]):
                save_now(run)


def train(config: Config, *, quiet: bool = False, max_steps: int | None = None) -> Path:
    """Run (or resume) training as ``config`` says; returns the checkpoint directory.

    ``max_steps`` stops early (the schedule still follows the config): used to simulate an
    interruption in tests. Ctrl-C or SIGTERM save and exit with 128 + the signal's number.
    """
    world = mx.distributed.init()
    check_batch_split(config.train, world.size())
    out_dir = Path(config.out_dir)
    lock = RunLock(out_dir) if world.rank() == 0 else nullcontext()
    with StopSignals() as signals, lock:
        run = setup_run(config, quiet=quiet, max_steps=max_steps)
        if isinstance(lock, RunLock) and lock.stale:
            run.warn(f"{lock.path} was left by pid {lock.stale.get('pid')}, which is gone (it "
                    "crashed or was killed): taken over")
        if run.state["step"] >= run.n_steps:  # nothing to train: leave the run as it is
            run.say(f"{run.model_dir} already finished all {run.n_steps} steps")
            return run.model_dir
        mx.reset_peak_memory()  # the logged peak is this run's, not the process's so far
        signals.defer()
        train_loop(run, signals)
        save_now(run)
        if signals.received is not None:
            name = signal.Signals(signals.received).name
            if run.saved_step is None:
                run.say(f"{name} before the first step: nothing to save")
            else:
                run.say(f"{name} at step {run.state['step']}: {run.model_dir} holds step "
                        f"{run.saved_step}; resume with train.resume=true")
            raise SystemExit(128 + signals.received)
        if run.eval_set is not None and run.state["step"] >= run.stop_at:
            evaluate_now(run, run.state["step"], run.say)
    run.say(f"saved {run.model_dir}")
    return run.model_dir


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
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM while the run was being set up
        print("error: interrupted before the first step; nothing was trained", file=sys.stderr)
        raise SystemExit(128 + getattr(e, "signum", signal.SIGINT)) from None
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # a write failed: the disk, permissions, a read-only mount
        print(f"error: {e.strerror or e} ({e.filename or config.out_dir}); the last checkpoint "
              "is intact: fix that, then resume with train.resume=true", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
