"""Nothing lost under any fault: non-finite steps, kills during a save, a second run on the same
out_dir, damaged files, a full disk, signals. Faults are injected by patching, on tiny runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_trm.training.loop as loop
import mlx_trm.training.run as train_module
import mlx_trm.training.run_dir as run_dir
from mlx_trm.checkpoint import load, save
from mlx_trm.cli import train as train_cli
from mlx_trm.config import ConfigError
from mlx_trm.training.run import run
from mlx_trm.training.run_dir import RunLock, checkpoint_step, recover_checkpoint
from tests.conftest import CONFIGS, ROOT, save_small_model
from tests.test_train import cli_overrides, losses, read_metrics, small_run_config


def quick(tmp_path, name, *extra):
    """The small run of test_train without evaluation, uncompiled: about a second."""
    return small_run_config(tmp_path, name, "train.eval_interval_sequences=null",
                            "train.compile=false", *extra)


def all_finite(tree) -> bool:
    return all(bool(mx.all(mx.isfinite(v))) for _, v in tree_flatten(tree))


# ------------------------------------------------------------------ non-finite steps


def test_a_non_finite_update_stops_before_anything_is_written(tmp_path, monkeypatch):
    """Step 3's update makes the weights NaN while its loss (computed before) is finite: the
    run stops, step 3 is neither logged nor saved, and the message names the kept step."""
    real = loop.learning_rate
    monkeypatch.setattr(loop, "learning_rate",
                        lambda step, tc, n: float("nan") if step == 3 else real(step, tc, n))
    config = quick(tmp_path, "nan", "train.checkpoint_interval_sequences=4")
    with pytest.raises(FloatingPointError, match=r"weights non-finite at step 3.*step-2 "
                                                 r"checkpoint"):
        run(config, quiet=True)
    out = tmp_path / "nan"
    assert checkpoint_step(out / "model") == 2
    model, _ = load(out)  # load() refuses non-finite weights: this one is clean
    optimizer_state = mx.load(str(out / "model/train_state/optimizer.safetensors"))
    assert all_finite(model.parameters()) and all_finite(optimizer_state)
    assert sorted(losses(out)) == [1, 2] and not (out / "train.lock").exists()


def test_a_nan_loss_stops_and_the_cli_says_so_in_one_line(tmp_path):
    args = cli_overrides(tmp_path, "nanloss") + [
        "train.lr=1e30", "train.grad_clip_norm=1e30", "train.lr_warmup_percent=0",
        "train.max_steps=50", "train.checkpoint_interval_sequences=4"]
    result = subprocess.run([sys.executable, "-m", "mlx_trm.cli.train", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert len(lines) == 1 and ("non-finite" in lines[0] or "nan" in lines[0])
    kept = checkpoint_step(tmp_path / "nanloss/model")
    assert f"step-{kept} checkpoint" in lines[0]
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "nanloss") if "loss" in r)
    load(tmp_path / "nanloss")  # finite: loads


@pytest.mark.parametrize("cli", ["evaluate", "generate"])
def test_evaluate_and_generate_refuse_non_finite_weights(cli, tmp_path, tinystories_dir):
    model, tokenizer = load(save_small_model(tmp_path / "ok", seq_len=32))
    model.embed_tokens.embedding_weight = model.embed_tokens.embedding_weight * float("nan")
    save(tmp_path / "bad", model, tokenizer)
    with pytest.raises(ConfigError, match="NaN or infinite values in 1 of"):
        load(tmp_path / "bad")
    args = {"evaluate": ["--data", str(tinystories_dir), "--max-stories", "2"],
            "generate": ["--prompt", "Once", "--max-tokens", "3"]}[cli]
    result = subprocess.run([sys.executable, "-m", f"mlx_trm.cli.{cli}", "--model",
                             str(tmp_path / "bad"), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "diverged" in result.stderr


# ------------------------------------------------------------------ kills during a save


class Killed(BaseException):
    """The process died here: nothing after it runs (cleanup included)."""


class FileFaults:
    """Counts the file operations of the save it is armed for and kills the process at the
    ``kill_at``-th; once dead, every file operation fails too (no cleanup runs, the lock file
    stays). Counted: creating the temporary directory and each temporary file, writing each
    array file, each rename and the removal of the old copy (an fsync or a mkdir falls between
    two of them, so a kill there is a kill at the next one)."""

    COUNTED = [(os, "replace"), (os, "rename"), (shutil, "rmtree"), (tempfile, "mkdtemp"),
               (tempfile, "mkstemp"), (mx, "save_safetensors")]
    PATCHED = [*COUNTED, (os, "mkdir"), (os, "fsync"), (os, "unlink")]

    def __init__(self, monkeypatch, kill_at: int | None, save_number: int = 1):
        self.kill_at, self.count, self.armed, self.dead = kill_at, 0, False, False
        for owner, name in self.PATCHED:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name),
                                                        (owner, name) in self.COUNTED))
        real_save, saves = run_dir.save, [0]

        def save(*args, **kwargs):
            saves[0] += 1
            self.armed = saves[0] == save_number
            try:
                return real_save(*args, **kwargs)
            finally:
                self.armed = False

        monkeypatch.setattr(run_dir, "save", save)

    def _wrap(self, fn, counted: bool):
        def op(*args, **kwargs):
            if self.dead:
                raise Killed
            if self.armed and counted:
                self.count += 1
                if self.count == self.kill_at:
                    self.dead = True
                    raise Killed
            return fn(*args, **kwargs)

        return op


def test_a_kill_at_any_file_operation_of_a_save_resumes_exactly(tmp_path):
    full = quick(tmp_path, "full")
    run(full, quiet=True)
    expected = losses(tmp_path / "full")
    template = tmp_path / "template"
    run(quick(tmp_path, "template"), quiet=True, max_steps=2)  # checkpoint at step 2
    shutil.copytree(template, tmp_path / "count")
    with pytest.MonkeyPatch.context() as mp:  # how many operations the save at step 4 has
        counter = FileFaults(mp, kill_at=None)
        run(quick(tmp_path, "count", "train.resume=true"), quiet=True)
    n_ops = counter.count
    assert n_ops >= 10
    for kill_at in range(1, n_ops + 1):
        name = f"kill{kill_at}"
        shutil.copytree(template, tmp_path / name)
        with pytest.MonkeyPatch.context() as mp:  # the save at step 4 dies
            FileFaults(mp, kill_at=kill_at)
            with pytest.raises(Killed):
                run(quick(tmp_path, name, "train.resume=true"), quiet=True)
        assert checkpoint_step(tmp_path / name / "model") in (2, 4, None), kill_at
        run(quick(tmp_path, name, "train.resume=true"), quiet=True)
        out = tmp_path / name
        steps = [r["step"] for r in read_metrics(out) if "loss" in r]
        assert steps == [1, 2, 3, 4, 5, 6], (kill_at, steps)  # each step logged once
        got = losses(out)
        assert all(got[s] == pytest.approx(expected[s], rel=1e-6, abs=1e-6) for s in got), kill_at
        assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl", "model"]


def test_recovery_takes_the_newest_complete_copy(tmp_path):
    run(quick(tmp_path, "run"), quiet=True, max_steps=2)
    model_dir = tmp_path / "run/model"
    newer = tmp_path / "run/.model.tmp-abc"
    shutil.copytree(model_dir, newer)
    state = json.loads((newer / "train_state/state.json").read_text())
    (newer / "train_state/state.json").write_text(json.dumps({**state, "step": 4}))
    cut = tmp_path / "run/.model.tmp-cut"  # a save killed before state.json was written
    shutil.copytree(model_dir, cut)
    (cut / "train_state/state.json").unlink()
    shutil.move(model_dir, tmp_path / "run/.model.old-abc")  # killed between the two renames
    notes = recover_checkpoint(model_dir)
    assert checkpoint_step(model_dir) == 4 and "step-4" in notes[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.yaml", "metrics.jsonl", "model"]
    # a truncated weights file is not a complete copy
    shutil.copytree(model_dir, newer)
    (newer / "train_state/state.json").write_text(json.dumps({**state, "step": 6}))
    weights = newer / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    recover_checkpoint(model_dir)
    assert checkpoint_step(model_dir) == 4 and not newer.exists()


# ------------------------------------------------------------------ one run per out_dir


def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from mlx_trm.training.run_dir import RunLock\n"
        f"with RunLock(Path({str(tmp_path / 'busy')!r})):\n"
        "    print('locked', flush=True); time.sleep(60)")], cwd=ROOT, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another training run \(pid "
                                              rf"{holder.pid} on"):
            run(quick(tmp_path, "busy"), quiet=True)
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale, and the next run takes it over
    assert (tmp_path / "busy/train.lock").exists()
    with RunLock(tmp_path / "busy") as lock:
        assert lock.stale["pid"] == holder.pid
    assert not (tmp_path / "busy/train.lock").exists()
    run(quick(tmp_path, "busy"), quiet=True, max_steps=1)
    assert not (tmp_path / "busy/train.lock").exists()


# ------------------------------------------------------------------ damaged files, full disk


def test_damaged_checkpoint_files_are_one_line_errors(tmp_path):
    run(quick(tmp_path, "run"), quiet=True, max_steps=2)
    resume = quick(tmp_path, "run", "train.resume=true")
    ts = tmp_path / "run/model/train_state"
    good = {p: p.read_bytes() for p in (ts / "state.json", ts / "optimizer.safetensors",
                                        tmp_path / "run/model/model.safetensors")}
    damage = [(ts / "state.json", b"\xff\xfe garbage", "state.json cannot be read"),
              (ts / "state.json", b"{not json", "state.json cannot be read"),
              (ts / "optimizer.safetensors", os.urandom(64), "optimizer.safetensors is"),
              (tmp_path / "run/model/model.safetensors", None, "model.safetensors is truncated")]
    for path, data, message in damage:
        path.write_bytes(data if data is not None else good[path][: len(good[path]) // 2])
        with pytest.raises(ConfigError, match=message) as e:
            run(resume, quiet=True)
        assert "\n" not in str(e.value)
        if path.name == "model.safetensors":
            with pytest.raises(ConfigError, match="truncated"):
                load(tmp_path / "run")
        path.write_bytes(good[path])
    run(resume, quiet=True, max_steps=3)  # repaired: resumes


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_what_was_needed(tmp_path,
                                                                           monkeypatch):
    run(quick(tmp_path, "full"), quiet=True, max_steps=2)
    before = (tmp_path / "full/model/model.safetensors").read_bytes()
    real = mx.save_safetensors

    def no_space(path, *args, **kwargs):
        if "optimizer" in str(path):
            raise RuntimeError("[write] Unable to write 8 bytes to file.")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", no_space)
    with pytest.raises(ConfigError, match=r"could not write the step-4 checkpoint.*Unable to "
                                          r"write.*needs about [0-9.]+ MB.*step-2 checkpoint"):
        run(quick(tmp_path, "full", "train.resume=true"), quiet=True)
    assert (tmp_path / "full/model/model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [
        "config.yaml", "metrics.jsonl", "model"]
    monkeypatch.setattr(mx, "save_safetensors", real)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(ConfigError, match=r"not enough free space.*0\.0 MB are free"):
        run(quick(tmp_path, "full", "train.resume=true"), quiet=True)


# ------------------------------------------------------------------ resume settings and records


def test_resume_compares_data_settings_and_keeps_config_yaml(tmp_path):
    run(quick(tmp_path, "run"), quiet=True, max_steps=2)
    written = (tmp_path / "run/config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"data\.max_stories: 48 vs 40"):
        run(quick(tmp_path, "run", "train.resume=true", "data.max_stories=40"), quiet=True)
    with pytest.raises(ConfigError, match=r"data\.packing"):
        run(quick(tmp_path, "run", "train.resume=true", "data.packing=true"), quiet=True)
    run(quick(tmp_path, "run", "train.resume=true", "train.log_interval=2",
                f"data.cache_dir={tmp_path}/cache2"), quiet=True, max_steps=4)
    assert (tmp_path / "run/config.yaml").read_text() == written
    resumed = [r for r in read_metrics(tmp_path / "run") if r.get("resumed")]
    assert resumed[0]["step"] == 2 and resumed[0]["changed"]["train.log_interval"] == [1, 2]


# ------------------------------------------------------------------ signals


def test_sigterm_saves_like_ctrl_c(tmp_path):
    args = cli_overrides(tmp_path, "term") + ["train.max_steps=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_trm.cli.train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or
                                      len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM at step" in err and "resume with train.resume=true" in err
    assert checkpoint_step(tmp_path / "term/model") >= 3
    assert not (tmp_path / "term/train.lock").exists()


def test_ctrl_c_before_the_first_step(tmp_path, monkeypatch, capsys):
    real_defer = train_module.StopSignals.defer

    def defer_then_ctrl_c(self):
        real_defer(self)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_module.StopSignals, "defer", defer_then_ctrl_c)
    with pytest.raises(SystemExit) as e:  # a new run: nothing to save
        run(quick(tmp_path, "early"), quiet=False)
    assert e.value.code == 130 and not (tmp_path / "early/model").exists()
    assert "SIGINT before the first step: nothing to save" in capsys.readouterr().err
    monkeypatch.undo()
    run(quick(tmp_path, "early2"), quiet=True, max_steps=2)
    weights = tmp_path / "early2/model/model.safetensors"
    mtime = weights.stat().st_mtime_ns
    monkeypatch.setattr(train_module.StopSignals, "defer", defer_then_ctrl_c)
    with pytest.raises(SystemExit) as e:  # a resumed run: its checkpoint stays as it was
        run(quick(tmp_path, "early2", "train.resume=true"), quiet=True)
    assert e.value.code == 130 and weights.stat().st_mtime_ns == mtime
    # during the set-up (data, model): one line from the CLI
    monkeypatch.setattr(train_module, "setup_run", lambda *a, **k: os.kill(os.getpid(),
                                                                            signal.SIGTERM))
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--config", str(CONFIGS / "trm_tinystories_1m.yaml"),
                        f"out_dir={tmp_path}/setup"])
    assert e.value.code == 143 and "interrupted before the first step" in capsys.readouterr().err
    assert not (tmp_path / "early2/train.lock").exists()
