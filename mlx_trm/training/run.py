"""Train a recursive LM from a config (``mlx_trm.train --config configs/X.yaml [k=v ...]``).

This module builds what the loop (:func:`mlx_trm.training.loop.train`) is handed, from the
config: the run directory (:class:`~mlx_trm.training.run_dir.RunDir`: lock, resume, checkpoints,
metrics), the tokenizer and data, the model and optimizer, the evaluation, and the callbacks that
log, show progress and save. Nothing non-finite is ever written: a step whose loss, gradient norm or
updated weights are not finite stops the run before it is logged or saved. Ctrl-C and SIGTERM
stop after the current step and save.
Data parallel: ``mlx.launch -n 2 --backend ring -m mlx_trm.cli.train --config ...`` splits every
global batch across ranks and sums the gradients; rank 0 alone prints and writes.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..blas import prepare_cpu_backend
from ..config import Config, ConfigError, TrainConfig
from ..data.batches import eval_batches, load_split, stream_batches
from ..data.tokenizer import load_tokenizer
from ..models import build_model
from .evaluation import COLLAPSE_NOTE, COLLAPSED_SPREAD, evaluate_batches, make_eval_fn
from .loop import TrainingCallback, new_state, train
from .memory import fit_memory
from .progress import TrainProgress
from .run_dir import RunDir
from .step import make_optimizer, total_steps

# ---------------------------------------------------------------------------------- building


def check_batch_split(tc: TrainConfig, ranks: int) -> None:
    if tc.global_batch_size % ranks:
        raise ConfigError(f"train.global_batch_size {tc.global_batch_size} is not divisible by "
                          f"the {ranks} ranks; choose a multiple of {ranks}")
    if (tc.global_batch_size // ranks) % tc.grad_accum_steps:
        raise ConfigError(f"the per-rank batch {tc.global_batch_size // ranks} is not divisible "
                          f"by train.grad_accum_steps {tc.grad_accum_steps}")


def load_data(config: Config, world: Any) -> tuple[Any, Any, list | None]:
    """(tokenizer, the training split, this rank's rows of the evaluation batches or None)."""
    tc, mc, dc = config.train, config.model, config.data
    tokenizer = load_tokenizer(dc.tokenizer)
    if tokenizer.vocab_size > mc.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
                          f"{mc.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
    train_data = load_split(dc, "train", tokenizer)
    if not tc.eval_interval_sequences:
        return tokenizer, train_data, None
    valid_data = load_split(dc, "validation", tokenizer)
    rank, size = world.rank(), world.size()
    eval_set = [(x[rank::size], y[rank::size]) for x, y in
                eval_batches(valid_data, tc.global_batch_size, mc.seq_len, tc.eval_batches,
                             seed=tc.seed, max_sequences=tc.max_sequences)]
    return tokenizer, train_data, eval_set


def setup_run(config: Config, run_dir: RunDir, world: Any) -> tuple:
    """The loop's objects: (tokenizer, model, optimizer, state, carry, batches, evaluate).
    Fails (one line) on bad settings before any model work."""
    tc, mc = config.train, config.model
    run_dir.check_resume()
    if world.rank() == 0:
        prepare_cpu_backend()
    tokenizer, train_data, eval_set = load_data(config, world)  # bad paths fail here
    mx.random.seed(tc.seed)
    model = build_model(mc)
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    state, carry = run_dir.restore(model, optimizer)
    state = state or new_state()
    mx.eval(model.parameters(), optimizer.state)
    fit_memory(model, config, world.size(), warn=world.rank() == 0)  # or a warning
    batches = stream_batches(train_data, tc.global_batch_size, mc.seq_len, seed=tc.seed,
                             start_epoch=state["epoch"], start_batch=state["batch_index"] + 1,
                             max_sequences=tc.max_sequences, packing=config.data.packing,
                             drop_remainder=world.size() > 1)
    evaluate = None
    if eval_set is not None:
        evaluate = partial(evaluate_batches, make_eval_fn(model, compile=tc.compile), eval_set,
                           world)
    return tokenizer, model, optimizer, state, carry, batches, evaluate


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


# -------------------------------------------------------------------------- signals and reports


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


class RunCallbacks(TrainingCallback):
    """The loop's reports into the run directory (metrics.jsonl) and onto the progress display;
    its checkpoints into the run directory; a stop on Ctrl-C or SIGTERM."""

    def __init__(self, run_dir: RunDir, progress: TrainProgress, signals: StopSignals,
                 saving: Callable[[dict, dict], None], stop_at: int):
        self.run_dir, self.progress, self.signals = run_dir, progress, signals
        self.saving, self.stop_at = saving, stop_at
        self.collapsed = False

    def on_step(self, step: int, report: dict | None) -> None:
        if report is not None:
            self.run_dir.log(report)
        self.progress.update(step, report)

    def on_eval(self, step: int, sequences: int, result: dict) -> None:
        self.run_dir.log({"step": step, "sequences": sequences, "split": "validation",
                          **{f"val_{k}": v for k, v in result.items()}})
        label = "final" if step == self.stop_at and step > 0 else f"step {step}"
        self.on_note(f"{label}: val token CE {result['token_ce']:.4f}, "
                     f"ppl {result['perplexity']:.1f}")
        if result["latent_spread"] < COLLAPSED_SPREAD and not self.collapsed and step > 0:
            self.on_note(f"step {step}: latent spread {result['latent_spread']:.1e}. "
                         f"{COLLAPSE_NOTE}")
        self.collapsed = self.collapsed or result["latent_spread"] < COLLAPSED_SPREAD

    def on_note(self, message: str) -> None:
        self.progress.note(message)

    def save(self, carry: dict, state: dict) -> None:
        self.saving(carry, state)

    def should_stop(self) -> bool:
        return self.signals.received is not None


# ---------------------------------------------------------------------------------- the run


def run(config: Config, *, quiet: bool = False, max_steps: int | None = None) -> Path:
    """Run (or resume) training as ``config`` says; returns the checkpoint directory.

    ``max_steps`` stops early (the schedule still follows the config): used to simulate an
    interruption in tests. Ctrl-C or SIGTERM save and exit with 128 + the signal's number.
    """
    world = mx.distributed.init()
    check_batch_split(config.train, world.size())
    leader = world.rank() == 0
    warn = (lambda *a: print(*a, file=sys.stderr)) if leader else (lambda *a: None)
    say = warn if not quiet else (lambda *a: None)
    n_steps = total_steps(config.train)
    stop_at = min(n_steps, max_steps) if max_steps else n_steps
    with StopSignals() as signals, RunDir(config, leader=leader, warn=warn) as run_dir:
        tokenizer, model, optimizer, state, carry, batches, evaluate = setup_run(
            config, run_dir, world)
        if carry is not None:
            say(f"resuming {run_dir.model_dir} at step {state['step']}")
        if state["step"] >= n_steps:  # nothing to train: leave the run as it is
            say(f"{run_dir.model_dir} already finished all {n_steps} steps")
            return run_dir.model_dir
        run_dir.start(state["step"], state["sequences_seen"],
                      _init_wandb(config) if leader else None)
        progress = TrainProgress(stop_at, state["step"], enabled=leader and not quiet)
        callbacks = RunCallbacks(run_dir, progress, signals, stop_at=stop_at,
                                 saving=partial(run_dir.save, model, tokenizer, optimizer))
        signals.defer()
        try:
            with progress:
                state = train(model, optimizer, batches, evaluate, config.train, callbacks,
                              state=state, carry=carry, stop_at=stop_at)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e}: {run_dir.kept()} (lower train.lr in a new "
                                     "out_dir, or check the data)") from None
        if signals.received is not None:
            name = signal.Signals(signals.received).name
            if run_dir.saved_step is None:
                say(f"{name} before the first step: nothing to save")
            else:
                say(f"{name} at step {state['step']}: {run_dir.model_dir} holds step "
                    f"{run_dir.saved_step}; resume with train.resume=true")
            raise SystemExit(128 + signals.received)
    say(f"saved {run_dir.model_dir}")
    return run_dir.model_dir
