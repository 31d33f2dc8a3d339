"""Training: schedule, reference step parity, resume equivalence, safety, data parallelism."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_trm.config import ConfigError, TrainConfig, load_config
from mlx_trm.training.run import run
from mlx_trm.training.step import learning_rate, make_optimizer, make_step_functions, train_step
from tests.conftest import CONFIGS, ROOT, reference_cases


def test_warmup_cosine_schedule_on_one_based_steps():
    tc = TrainConfig(lr=1e-2, lr_min_ratio=0.01, lr_warmup_percent=0.02)
    n = 32813
    warm = int(0.02 * n)
    assert warm == 656
    assert learning_rate(1, tc, n) == pytest.approx(1e-2 / 656)
    assert learning_rate(655, tc, n) == pytest.approx(1e-2 * 655 / 656)
    assert learning_rate(656, tc, n) == pytest.approx(1e-2)
    mid = 656 + (n - 656) // 2
    p = (mid - 656) / (n - 656)
    expected = 1e-2 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p)))
    assert learning_rate(mid, tc, n) == pytest.approx(expected)
    assert learning_rate(n, tc, n) == pytest.approx(1e-4)
    constant = TrainConfig(lr=1e-3, lr_min_ratio=1.0, lr_warmup_percent=0.0)
    assert learning_rate(1, constant, 3) == learning_rate(3, constant, 3) == pytest.approx(1e-3)


# ------------------------------------------------------------------ parity with the reference


@pytest.mark.parametrize("folder", reference_cases())
@pytest.mark.usefixtures("kernels")  # both sets of branches (conftest.py)
def test_first_steps_give_the_reference_losses(folder, tmp_path):
    """From the converted step_0.pt, three steps on the fixture's batches give its losses."""
    pytest.importorskip("torch", reason="converting the fixture needs the torch extra")
    from mlx_trm.checkpoint import load
    from mlx_trm.interop.convert import torch_to_mlx
    from mlx_trm.models import initial_carry

    e = np.load(folder / "expected.npz")
    model, _ = load(torch_to_mlx(folder / "step_0.pt", tmp_path / "m"))
    tc = TrainConfig(global_batch_size=2, lr=1e-3, lr_min_ratio=1.0, lr_warmup_percent=0.0,
                     max_steps=3)
    optimizer = make_optimizer(tc)
    step_fns = make_step_functions(model, optimizer, tc, compile=False)
    carry = initial_carry(model, *e["train_inputs"].shape[1:])
    mx.random.seed(0)
    for step in range(3):
        optimizer.learning_rate = learning_rate(step + 1, tc, 3)
        inputs, labels = mx.array(e["train_inputs"][step]), mx.array(e["train_labels"][step])
        carry, metrics, _ = train_step(step_fns, carry, inputs, labels, 1, mx.random.key(step))
        total, lm, q_halt = e["train_losses"][step]
        assert float(metrics["lm_loss"]) == pytest.approx(lm, rel=2e-5, abs=2e-4)
        assert float(metrics["q_halt_loss"]) == pytest.approx(q_halt, rel=1e-4, abs=1e-5)
        assert float(metrics["total"]) == pytest.approx(total, rel=2e-5, abs=2e-4)
        if "moe_reg" in metrics:
            assert float(metrics["moe_reg"]) == pytest.approx(e["train_moe_reg"][step], rel=1e-4)
        assert carry["halted"].tolist() == e["train_halted"][step].tolist()
        assert carry["steps"].tolist() == e["train_act_steps"][step].tolist()
    # after three steps the weights are the reference's step_3 weights
    reference, _ = load(torch_to_mlx(folder / "step_3.pt", tmp_path / "ref"))
    from mlx.utils import tree_flatten

    # Adam divides by sqrt(v) + 1e-8: where a gradient is ~1e-8, float rounding of the gradient
    # moves the update by a visible fraction of lr (1e-3). So: nearly all weights agree to 2e-5,
    # and none is off by more than a fraction of one step's update.
    ours = dict(tree_flatten(model.parameters()))
    for key, value in tree_flatten(reference.parameters()):
        diff = np.abs(np.array(ours[key]) - np.array(value))
        assert diff.max() <= 5e-4, key
        assert (diff <= 2e-5).mean() >= 0.999, key


# ------------------------------------------------------------------ runs on the sample data


def small_run_config(tmp_path, name="run", *extra):
    """A tiny dense TRM + ACT on a slice of the TinyStories sample: seconds per run."""
    from tests.conftest import TINYSTORIES

    overrides = [
        f"data.path={TINYSTORIES}", "data.max_stories=48", f"data.cache_dir={tmp_path}/cache",
        "model.hidden_size=16", "model.num_heads=2", "model.expansion=2", "model.seq_len=32",
        "model.L_cycles=2", "model.halt_max_steps=2",
        "train.global_batch_size=4", "train.max_steps=6", "train.log_interval=1",
        "train.eval_interval_sequences=12", "train.eval_batches=1",
        "train.checkpoint_interval_sequences=8", f"out_dir={tmp_path}/{name}", *extra,
    ]
    return load_config(CONFIGS / "trm_tinystories_1m.yaml", overrides)


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    full = small_run_config(tmp_path, "full")
    run(full, quiet=True)
    interrupted = small_run_config(tmp_path, "resumed")
    run(interrupted, quiet=True, max_steps=3)  # stops after step 3, checkpoint saved
    state = json.loads((tmp_path / "resumed/model/train_state/state.json").read_text())
    assert state["step"] == 3
    resumed = small_run_config(tmp_path, "resumed", "train.resume=true")
    run(resumed, quiet=True)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
    # resuming a finished run trains, evaluates and writes nothing
    metrics = tmp_path / "resumed/metrics.jsonl"
    weights = tmp_path / "resumed/model/model.safetensors"
    before = metrics.read_bytes(), weights.stat().st_mtime_ns
    run(resumed, quiet=True)
    assert (metrics.read_bytes(), weights.stat().st_mtime_ns) == before


def test_resume_refuses_other_training_settings(tmp_path):
    run(small_run_config(tmp_path, "run"), quiet=True, max_steps=2)
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 vs 0\.005.*own settings"):
        run(small_run_config(tmp_path, "run", "train.resume=true", "train.lr=0.005"),
              quiet=True)
    with pytest.raises(ConfigError, match=r"model\.L_cycles"):
        run(small_run_config(tmp_path, "run", "train.resume=true", "model.L_cycles=3"),
              quiet=True)
    # evaluation, logging and checkpoint intervals do not change the weights: free to change
    run(small_run_config(tmp_path, "run", "train.resume=true", "train.eval_batches=2",
                           "train.log_interval=3"), quiet=True, max_steps=3)
    assert json.loads((tmp_path / "run/model/train_state/state.json").read_text())["step"] == 3


def test_logged_peak_memory_is_the_runs_own(tmp_path):
    """Work done earlier in the process (a comparison's previous variant) does not count."""
    big = mx.zeros((50_000_000,))  # 200 MB
    mx.eval(big)
    del big
    run(small_run_config(tmp_path, "peak"), quiet=True, max_steps=2)
    peaks = [r["peak_memory_gb"] for r in read_metrics(tmp_path / "peak") if "loss" in r]
    assert peaks and 0 < max(peaks) < 0.1


def test_act_warmup_runs_one_act_step_per_batch_then_the_carry(tmp_path):
    """train.act_warmup_percent=0.5 of 6 steps: steps 1-3 adopt a new batch every step."""
    from mlx_trm.models import initial_carry
    from mlx_trm.training.step import make_step_functions as make

    def carry_after(name, steps, *extra):
        config = small_run_config(tmp_path, name, *extra)
        run(config, quiet=True, max_steps=steps)
        return mx.load(str(tmp_path / name / "model/train_state/carry.safetensors"))

    # halt_max_steps=2: without warm-up, the batch adopted at step 3 still has a step to go
    assert carry_after("plain", 3)["halted"].tolist() == [False] * 4
    warm = carry_after("warm", 3, "train.act_warmup_percent=0.5")
    assert warm["halted"].tolist() == [True] * 4 and warm["steps"].tolist() == [1] * 4
    after = carry_after("warm_after", 4, "train.act_warmup_percent=0.5")
    assert after["halted"].tolist() == [False] * 4 and after["steps"].tolist() == [1] * 4
    # resuming inside the warm-up gives the uninterrupted run's losses
    run(small_run_config(tmp_path, "warm_full", "train.act_warmup_percent=0.5"), quiet=True)
    resumed = small_run_config(tmp_path, "warm", "train.act_warmup_percent=0.5",
                               "train.resume=true")
    run(resumed, quiet=True)
    a, b = losses(tmp_path / "warm_full"), losses(tmp_path / "warm")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
    # the warm-up step function is the ACT step with halt_max_steps=1: every row halts
    from mlx_trm.checkpoint import load

    model, _ = load(tmp_path / "warm_full")
    tc = TrainConfig(global_batch_size=4)
    fns = make(model, make_optimizer(tc), tc, compile=False, halt_max_steps=1)
    inputs = mx.ones((4, 32), dtype=mx.int32)
    carry, _, _ = train_step(fns, initial_carry(model, 4, 32), inputs, inputs, 1,
                             mx.random.key(0))
    assert carry["halted"].tolist() == [True] * 4


def test_a_run_learns_and_logs_evaluations(tmp_path):
    config = small_run_config(tmp_path, "learn", "train.max_steps=12", "train.lr=0.02")
    model_dir = run(config, quiet=True)
    records = read_metrics(tmp_path / "learn")
    evals = [r for r in records if r.get("split") == "validation"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["val_token_ce"] < evals[0]["val_token_ce"] - 1.0
    assert all(k in evals[-1] for k in ("val_perplexity", "val_reference_eval_loss"))
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.model").is_file()
    from mlx_trm.checkpoint import load

    model, tokenizer = load(tmp_path / "learn")  # a run directory loads as its model
    assert model.args.hidden_size == 16 and tokenizer is not None


def test_latent_spread_detects_a_collapsed_model():
    from mlx_trm.config import ModelConfig
    from mlx_trm.models import build_model
    from mlx_trm.training.evaluation import evaluate_batches, make_eval_fn

    mx.random.seed(0)
    model = build_model(ModelConfig(vocab_size=64, hidden_size=16, num_heads=2, expansion=2,
                                    L_cycles=2, halt_max_steps=2, seq_len=16))
    inputs = np.random.default_rng(0).integers(1, 64, (4, 16))
    batches = [(inputs, np.roll(inputs, -1, axis=1))]
    healthy = evaluate_batches(make_eval_fn(model, compile=False), batches)["latent_spread"]
    assert healthy > 0.05
    # with no token information every position refines the same H_init/L_init: one z_H
    model.embed_tokens.embedding_weight = mx.zeros_like(model.embed_tokens.embedding_weight)
    collapsed = evaluate_batches(make_eval_fn(model, compile=False), batches)["latent_spread"]
    assert collapsed < 1e-6


def test_existing_run_is_never_overwritten(tmp_path):
    run(small_run_config(tmp_path, "once", "train.max_steps=1"), quiet=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(small_run_config(tmp_path, "once", "train.max_steps=1"), quiet=True)


def test_nan_loss_stops_with_last_good_checkpoint_intact(tmp_path):
    config = small_run_config(tmp_path, "nan", "train.lr=1e30", "train.max_steps=50",
                              "train.checkpoint_interval_sequences=4", "train.grad_clip_norm=1e30",
                              "train.eval_interval_sequences=null", "train.lr_warmup_percent=0")
    with pytest.raises(FloatingPointError, match=r"holds the step-\d+ checkpoint") as e:
        run(config, quiet=True)
    state = json.loads((tmp_path / "nan/model/train_state/state.json").read_text())
    assert f"step-{state['step']} checkpoint" in str(e.value)
    from mlx_trm.checkpoint import load

    model, _ = load(tmp_path / "nan")
    from mlx.utils import tree_flatten

    assert all(bool(mx.all(mx.isfinite(v))) for _, v in tree_flatten(model.parameters()))
    assert state["step"] >= 1


def test_impossible_values_are_rejected_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        small_run_config(tmp_path, "bad", "train.grad_accum_steps=3")
    config = small_run_config(tmp_path, "bad", "data.path=/nonexistent/stories")
    with pytest.raises(ConfigError, match="/nonexistent/stories"):
        run(config, quiet=True)
    assert not (tmp_path / "bad").exists()


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one = small_run_config(tmp_path, "accum1", "train.max_steps=3",
                           "train.eval_interval_sequences=null")
    two = small_run_config(tmp_path, "accum2", "train.max_steps=3", "train.grad_accum_steps=2",
                           "train.eval_interval_sequences=null")
    run(one, quiet=True)
    run(two, quiet=True)
    a, b = losses(tmp_path / "accum1"), losses(tmp_path / "accum2")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step


def run_cli(args, env=None, **kwargs):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mlx_trm.cli.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def cli_overrides(tmp_path, name):
    config = small_run_config(tmp_path, name)
    d = config.data
    return ["--config", str(CONFIGS / "trm_tinystories_1m.yaml"),
            f"data.path={d.path}", "data.max_stories=48", f"data.cache_dir={d.cache_dir}",
            "model.hidden_size=16", "model.expansion=2", "model.seq_len=32", "model.L_cycles=2",
            "model.halt_max_steps=2", "train.global_batch_size=4", "train.log_interval=1",
            "train.eval_interval_sequences=null", f"out_dir={tmp_path}/{name}"]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    result = run_cli(["--config", str(CONFIGS / "trm_tinystories_1m.yaml"), "train.lr_typo=1"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "did you mean" in result.stderr


def test_ctrl_c_saves_and_exits(tmp_path):
    args = cli_overrides(tmp_path, "sigint") + ["train.max_steps=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_trm.cli.train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sigint" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or
                                      len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resume with train.resume=true" in err
    state = json.loads((tmp_path / "sigint/model/train_state/state.json").read_text())
    assert state["step"] >= 3


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed")
def test_two_process_data_parallel_run_matches_one_process(tmp_path):
    """mlx.launch -n 2 over the ring backend on localhost: same losses as one process."""
    single = cli_overrides(tmp_path, "single") + ["train.max_steps=3"]
    assert run_cli(single).returncode == 0
    launch = [shutil.which("mlx.launch"), "-n", "2", "--backend", "ring", "--python",
              sys.executable, "-m", "mlx_trm.cli.train",
              *(cli_overrides(tmp_path, "ranks") + ["train.max_steps=3"])]
    result = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ranks")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    assert not (tmp_path / "ranks" / "model" / "train_state" / ".rank1").exists()
