"""The training loop on ready objects: no config file, run directory or display, only a model,
an optimizer, batches, an evaluation function, settings and callbacks."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_trm.config import ModelConfig, TrainConfig
from mlx_trm.models import build_model
from mlx_trm.training.loop import TrainingCallback, train
from mlx_trm.training.step import make_optimizer


class Recorder(TrainingCallback):
    def __init__(self, stop_after: int | None = None):
        self.reports, self.evaluations, self.saves = [], [], []
        self.stop_after, self.step = stop_after, 0

    def on_step(self, step, report):
        self.step = step
        if report is not None:
            self.reports.append(report)

    def on_eval(self, step, sequences, result):
        self.evaluations.append((step, sequences))

    def save(self, carry, state):
        self.saves.append(state["step"])

    def should_stop(self):
        return self.stop_after is not None and self.step >= self.stop_after


def ready_objects():
    mx.random.seed(0)
    model = build_model(ModelConfig(vocab_size=64, hidden_size=16, num_heads=2, expansion=2,
                                    L_cycles=2, halt_max_steps=2, seq_len=16))
    args = TrainConfig(global_batch_size=4, max_steps=5, lr=1e-2, log_interval=2,
                       eval_interval_sequences=8, checkpoint_interval_sequences=12,
                       compile=False)
    rng = np.random.default_rng(0)

    def batches():  # (epoch, index, inputs, labels), as data.stream_batches yields them
        for index in itertools.count():
            inputs = rng.integers(1, 64, (4, 16))
            yield 1, index, inputs, np.roll(inputs, -1, axis=1)

    return model, make_optimizer(args), batches(), args


def test_the_loop_reports_evaluates_and_saves_when_due():
    model, optimizer, batches, args = ready_objects()
    calls = Recorder()
    state = train(model, optimizer, batches, lambda: {"token_ce": 1.0}, args, calls)
    assert state["step"] == 5 and state["sequences_seen"] == 20 and state["batch_index"] == 4
    assert [r["step"] for r in calls.reports] == [2, 4, 5]  # every log_interval, and the last
    assert all(np.isfinite(r["loss"]) and r["tokens_per_sec"] > 0 for r in calls.reports)
    # every 8 sequences (2 steps), before the first step and at the end
    assert calls.evaluations == [(0, 0), (2, 8), (4, 16), (5, 20)]
    assert calls.saves == [3, 5]  # every 12 sequences, and at the end


def test_a_stop_request_saves_the_step_reached_and_skips_the_final_evaluation():
    model, optimizer, batches, args = ready_objects()
    calls = Recorder(stop_after=1)
    state = train(model, optimizer, batches, lambda: {"token_ce": 1.0}, args, calls)
    assert state["step"] == 1 and calls.saves == [1] and calls.evaluations == [(0, 0)]


def test_a_non_finite_step_stops_before_it_is_reported_or_saved():
    model, optimizer, batches, args = ready_objects()
    args.lr = float("nan")
    calls = Recorder()
    with pytest.raises(FloatingPointError, match="non-finite at step 1; nothing of it"):
        train(model, optimizer, batches, None, args, calls)
    assert calls.reports == [] and calls.saves == []
