"""A training run's directory (``out_dir``): its lock, its checkpoint and its metrics.

:class:`RunDir` is the one object ``mlx_trm.train`` holds for it: it takes the lock, decides
and checks a resume (repairing what an interrupted save left), restores and writes checkpoints
and appends the metrics. On disk:

- ``train.lock``: who is training here (pid, host). One live run per directory; the lock is an
  ``flock`` on the file, which the kernel drops when its process dies, so a lock left behind by
  a crash is recognised as stale and taken over.
- ``model/``: the latest checkpoint, a model directory plus ``train_state/`` (optimizer, carry,
  ``state.json`` written last). It is replaced atomically; after a crash in the middle of a
  replacement :func:`recover_checkpoint` puts the newest complete copy back in place.
- ``metrics.jsonl``: one JSON object per log line and evaluation. A resumed run first drops the
  records past its checkpoint (the steps it is about to redo), then notes the resume.
- ``config.yaml``: the settings the run was started with; a resumed run leaves it alone.

Data parallel: every rank checks and restores; only the leader (rank 0) locks and writes.
"""

from __future__ import annotations

import fcntl  # POSIX, as MLX itself (macOS, Linux)
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import yaml
from mlx.utils import tree_flatten, tree_unflatten

from ..checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_weights_strict,
    read_safetensors,
    require_finite,
    safetensors_problem,
    save,
)
from ..config import Config, ConfigError, config_from_dict, load_config
from ..files import atomic_write, replacement_leftovers

MODEL_SUBDIR = "model"
TRAIN_STATE = "train_state"
LOCK_FILE = "train.lock"
METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------------- the lock


class RunLock:
    """Hold ``out_dir/train.lock`` for the length of a run (``with RunLock(out_dir) as lock``)."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.path = Path(out_dir), Path(out_dir) / LOCK_FILE
        self.fd: int | None = None
        self.created_dir = False
        self.stale: dict | None = None  # what a crashed run left in the file, if it did

    def __enter__(self) -> RunLock:
        self.created_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(self._busy_message(self._read_holder())) from None
            try:  # the holder may have removed the file between our open and our flock
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        self.stale = self._read_holder() or None  # left by a run that died holding it
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing drops the flock, whatever happened above
            self.fd = None
        if self.created_dir and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()  # a run that failed before writing anything leaves nothing

    def _read_holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _busy_message(self, holder: dict) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
               if holder else "another process")
        return (f"{self.out_dir} is in use by another training run ({who}); wait for it to "
                f"finish or stop it, or choose another out_dir (if no such run exists, delete "
                f"{self.path})")


# ---------------------------------------------------------------------------------- checkpoints


def checkpoint_step(model_dir: Path) -> int | None:
    """The step a complete checkpoint holds; None if ``model_dir`` is not one (or is cut short)."""
    ts = model_dir / TRAIN_STATE
    try:
        step = int(json.loads((ts / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (model_dir / CONFIG_FILE).is_file():
        return None
    files = (model_dir / WEIGHTS_FILE, ts / "optimizer.safetensors", ts / "carry.safetensors")
    return None if any(safetensors_problem(f) for f in files) else step


def recover_checkpoint(model_dir: Path) -> list[str]:
    """Put the newest complete checkpoint at ``model_dir`` and delete the leftovers of saves
    that were cut short; returns what was done, for the user.

    A save fills ``.model.tmp-*``, renames ``model`` to ``.model.old-*`` and the new copy to
    ``model``: a crash can leave either copy (or both) next to, or instead of, ``model``.
    """
    new, old = replacement_leftovers(model_dir)
    if not new and not old:
        return []
    candidates = [(step, d) for d in (model_dir, *new, *old)
                  if d.is_dir() and (step := checkpoint_step(d)) is not None]
    notes = []
    if candidates:
        step, best = max(candidates, key=lambda c: c[0])  # ties keep model_dir (listed first)
        if best != model_dir:
            if model_dir.exists():
                aside = model_dir.with_name(f".{model_dir.name}.old-recovered")
                shutil.rmtree(aside, ignore_errors=True)
                model_dir.rename(aside)
                old.append(aside)
            best.rename(model_dir)
            notes.append(f"recovered the step-{step} checkpoint from {best.name} (a save was "
                         "interrupted)")
    leftovers = [d for d in (*new, *old) if d.exists()]
    for d in leftovers:
        shutil.rmtree(d, ignore_errors=True)
    if leftovers:
        notes.append(f"removed {len(leftovers)} left-over temporary checkpoint "
                     f"director{'y' if len(leftovers) == 1 else 'ies'}")
    return notes


def checkpoint_bytes(*trees: Any) -> int:
    """Bytes the arrays of a checkpoint take on disk, plus 2 MB for the tokenizer and JSON."""
    return sum(v.nbytes for tree in trees for _, v in tree_flatten(tree)) + 2_000_000


def save_checkpoint(out_dir: Path, model: Any, tokenizer: Any, optimizer: optim.Optimizer,
                    carry: dict, state: dict, config: Config) -> Path:
    """The latest checkpoint: a model directory plus ``train_state/`` to resume exactly.

    A write that fails (a full disk, a read-only mount) leaves the previous checkpoint as it
    was and raises a ConfigError saying how much space the checkpoint needs.
    """
    model_dir = out_dir / MODEL_SUBDIR

    def write_train_state(dir: Path) -> None:
        ts = dir / TRAIN_STATE
        ts.mkdir()
        mx.save_safetensors(str(ts / "optimizer.safetensors"),
                            dict(tree_flatten(optimizer.state)))
        mx.save_safetensors(str(ts / "carry.safetensors"), carry)
        # last: a checkpoint with state.json is complete (checkpoint_step)
        atomic_write(ts / "state.json", json.dumps({**state, "config": config.to_dict()},
                                                   indent=2) + "\n")

    needed = checkpoint_bytes(model.parameters(), optimizer.state, carry)
    free = shutil.disk_usage(out_dir).free
    reason = None
    if free < needed:
        reason = "not enough free space"
    else:
        try:
            return save(model_dir, model, tokenizer, extra_files=write_train_state)
        except OSError as e:
            reason = e.strerror or str(e)
        except RuntimeError as e:  # mx.save_safetensors: "[write] Unable to write ..."
            reason = str(e)
        free = shutil.disk_usage(out_dir).free
    previous = checkpoint_step(model_dir)
    kept = (f"{model_dir} still holds the step-{previous} checkpoint" if previous is not None
            else "no checkpoint was written")
    raise ConfigError(f"could not write the step-{state['step']} checkpoint to {model_dir} "
                      f"({reason}): it needs about {needed / 1e6:.1f} MB and "
                      f"{free / 1e6:.1f} MB are free; {kept}; free some space, then resume "
                      "with train.resume=true")


def load_train_state(model_dir: Path, model: Any, optimizer: optim.Optimizer
                     ) -> tuple[dict, dict]:
    """Restore weights, optimizer state and carry from a checkpoint; returns (state, carry)."""
    ts = model_dir / TRAIN_STATE
    fix = (f"the checkpoint in {model_dir} is damaged: move it away and start a new run "
           "(or restore it from a backup)")
    try:
        state = json.loads((ts / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step")
    except FileNotFoundError:
        raise ConfigError(f"{model_dir} has no {TRAIN_STATE}/ to resume from; start a new run "
                          "(train.resume=false) or point out_dir at the run to continue") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise ConfigError(f"{ts / 'state.json'} cannot be read ({type(e).__name__}); {fix}"
                          ) from None
    weights = read_safetensors(model_dir / WEIGHTS_FILE, fix)
    require_finite(weights, model_dir / WEIGHTS_FILE)
    load_weights_strict(model, weights, str(model_dir))
    saved = read_safetensors(ts / "optimizer.safetensors", fix)
    expected = dict(tree_flatten(optimizer.state))
    if set(saved) != set(expected) or any(saved[k].shape != v.shape for k, v in expected.items()):
        raise ConfigError(f"{ts / 'optimizer.safetensors'} does not match the model's "
                          f"parameters; {fix}")
    optimizer.state = tree_unflatten(list(saved.items()))
    carry = read_safetensors(ts / "carry.safetensors", fix)
    state.pop("config", None)
    return state, carry


# ---------------------------------------------------------------------------------- settings


# Settings that do not change the trained weights: a resumed run may change them. The data
# settings all shape the batches except where the token cache lives and the validation set.
NOT_TRAINING = {
    "train": {"resume", "eval_interval_sequences", "eval_batches", "log_interval",
              "checkpoint_interval_sequences", "compile", "wandb", "wandb_project",
              "checkpoint_activations"},
    "data": {"cache_dir", "valid_path"},
}


def saved_config(out_dir: Path) -> Config | None:
    """The settings the run in ``out_dir`` was trained with: its checkpoint's, else config.yaml."""
    try:
        raw = json.loads((out_dir / MODEL_SUBDIR / TRAIN_STATE / "state.json").read_text())
        return config_from_dict(raw["config"])  # older runs: new fields get their defaults
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if (out_dir / "config.yaml").is_file():
        return load_config(out_dir / "config.yaml")
    return None


def changed_settings(saved: Config, config: Config) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (saved, now)}`` for every model, train and data setting that differs."""
    old, new = saved.to_dict(), config.to_dict()
    return {f"{section}.{key}": (old[section].get(key), value)
            for section in ("model", "train", "data") for key, value in new[section].items()
            if old[section].get(key) != value}


def check_same_training(out_dir: Path, config: Config) -> dict[str, tuple[Any, Any]]:
    """Refuse to continue a run with other model, training or data settings: the result would
    be neither run (a changed lr or ``max_steps`` silently bends the schedule mid-run).
    Returns the settings that did change and may (evaluation, logging, checkpoint intervals)."""
    saved = saved_config(Path(out_dir))
    if saved is None:
        return {}
    changed = changed_settings(saved, config)
    differ = [f"{key}: {a} vs {b}" for key, (a, b) in changed.items()
              if key.split(".", 1)[1] not in NOT_TRAINING.get(key.split(".", 1)[0], ())]
    if differ:
        raise ConfigError(f"{out_dir} was trained with other settings ({'; '.join(differ)}); "
                          "resume it with its own settings (its config.yaml) or choose "
                          "another out_dir")
    return changed


def write_config_yaml(out_dir: Path, config: Config, resuming: bool) -> None:
    """config.yaml says how the run was started: a resumed run does not rewrite it."""
    path = out_dir / "config.yaml"
    if not (resuming and path.is_file()):
        atomic_write(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------- metrics


def trim_metrics(path: Path, step: int) -> int:
    """Drop the records past ``step`` (all of them for a new run, step 0), and a line cut short
    by a crash; returns how many were dropped. A resumed run logs those steps again."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if step > 0 and isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


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


# ---------------------------------------------------------------------------------- the run


class RunDir:
    """``config.out_dir`` for the length of a run (``with RunDir(config) as run_dir``).

    In order: :meth:`check_resume` before any model work (recovers an interrupted save,
    refuses to overwrite a run or to continue one with other settings), :meth:`restore` once
    the model and optimizer exist, :meth:`start` when there is something to train, then
    :meth:`log` and :meth:`save` from the loop. ``warn`` says what was repaired or dropped.
    """

    def __init__(self, config: Config, *, leader: bool = True,
                 warn: Callable[[str], None] | None = None):
        self.config, self.leader = config, leader
        self.path = Path(config.out_dir)
        self.model_dir = self.path / MODEL_SUBDIR
        self.warn = warn or (lambda message: None)
        self.lock = RunLock(self.path) if leader else None
        self.changed: dict[str, tuple[Any, Any]] = {}  # settings a resume changed (and may)
        self.saved_step: int | None = None  # the step the checkpoint on disk holds
        self.metrics = MetricsLog(None)

    def __enter__(self) -> RunDir:
        if self.lock is not None:
            self.lock.__enter__()
            if self.lock.stale:
                self.warn(f"{self.lock.path} was left by pid {self.lock.stale.get('pid')}, "
                          "which is gone (it crashed or was killed): taken over")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.lock is not None:
            self.lock.__exit__(*exc)

    @property
    def resuming(self) -> bool:
        return self.config.train.resume and (self.model_dir / TRAIN_STATE).exists()

    def check_resume(self) -> None:
        """Resume or start: recover an interrupted save, refuse to overwrite a run, refuse
        other settings (those of evaluation and logging may change: :attr:`changed`)."""
        if self.leader:
            for note in recover_checkpoint(self.model_dir):
                self.warn(f"{self.path}: {note}")
        if not (self.model_dir / TRAIN_STATE).exists():
            if self.config.train.resume:
                self.warn(f"train.resume=true but {self.model_dir} holds no checkpoint: "
                          "starting a new run")
            return
        if not self.config.train.resume:
            raise ConfigError(f"{self.path} already holds a run; continue it with "
                              "train.resume=true or choose another out_dir")
        self.changed = check_same_training(self.path, self.config)

    def restore(self, model: Any, optimizer: optim.Optimizer) -> tuple[dict | None, dict | None]:
        """(state, carry) of the checkpoint, its weights and optimizer state loaded into
        ``model`` and ``optimizer``; (None, None) for a new run."""
        if not self.resuming:
            return None, None
        state, carry = load_train_state(self.model_dir, model, optimizer)
        self.saved_step = state["step"]
        return state, carry

    def start(self, step: int, sequences: int, mirror: Any = None) -> None:
        """Open the metrics (mirrored to ``mirror``, a wandb run, if given). The leader writes
        config.yaml for a new run and trims metrics.jsonl to the checkpoint (noting the resume
        and the settings it changed), so no step is logged twice."""
        if not self.leader:
            return
        self.metrics = MetricsLog(self.path / METRICS_FILE, mirror)
        write_config_yaml(self.path, self.config, resuming=step > 0)
        if dropped := trim_metrics(self.path / METRICS_FILE, step):
            self.warn(f"{self.path}: dropped {dropped} metrics records past step {step} (the "
                      "interrupted run's; they are logged again)")
        if step > 0:
            self.log({"step": step, "sequences": sequences, "resumed": True,
                      "changed": {k: list(v) for k, v in self.changed.items()}})

    def log(self, record: dict) -> None:
        self.metrics.write(record)

    def save(self, model: Any, tokenizer: Any, optimizer: optim.Optimizer, carry: dict,
             state: dict) -> None:
        if self.leader:
            save_checkpoint(self.path, model, tokenizer, optimizer, carry, state, self.config)
        self.saved_step = state["step"]

    def kept(self) -> str:
        """What the run directory holds now, for a message about a run that stopped."""
        if self.saved_step is None:
            return "no checkpoint had been written yet"
        return f"{self.model_dir} holds the step-{self.saved_step} checkpoint, untouched"
