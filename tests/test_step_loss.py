"""The step's loss exists once: training, the memory probe, evaluation and adaptive evaluation
all score with ``act_loss`` (the first three through ``step_loss``), so changing that one
function changes what each of them reports."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_trm.models.trm as trm
from mlx_trm.checkpoint import load
from mlx_trm.config import TrainConfig
from mlx_trm.generation.adaptive import halt_policy
from mlx_trm.models import initial_carry
from mlx_trm.training.evaluation import evaluate_adaptive, evaluate_batches, make_eval_fn
from mlx_trm.training.memory import _probe_peak
from mlx_trm.training.step import make_optimizer, make_step_functions, train_step
from tests.conftest import save_small_model

EXTRA_BYTES = 2**26  # the changed loss's temporary (64 MB): the probe's peak must see it


def four_results(model_dir, stories) -> dict[str, float]:
    """What each caller of the loss reports, each on a freshly loaded copy of the model."""
    model, tokenizer = load(model_dir)
    tc = TrainConfig(global_batch_size=2)
    inputs = mx.array(np.random.default_rng(0).integers(1, 500, (2, 32)))
    labels = mx.roll(inputs, -1, axis=1)
    fns = make_step_functions(model, make_optimizer(tc), tc, compile=False)
    _, metrics, _ = train_step(fns, initial_carry(model, 2, 32), inputs, labels, 1,
                               mx.random.key(0))
    model, _ = load(model_dir)
    evaluated = evaluate_batches(make_eval_fn(model, compile=False),
                                 [(np.array(inputs), np.array(labels))])
    adaptive = evaluate_adaptive(model, tokenizer, str(stories),
                                 halt_policy(model, "kl", 0.0), batch_size=2, compile=False)
    return {"train": float(metrics["total"]), "probe": _probe_peak(model, 2, 32, 64),
            "evaluate": evaluated["token_ce"], "adaptive": adaptive["token_ce"]}


def test_a_changed_loss_changes_training_the_probe_and_both_evaluations(tmp_path, monkeypatch):
    model_dir = save_small_model(tmp_path / "m", seq_len=32)
    stories = tmp_path / "stories.txt"
    stories.write_text("Once upon a time there was a cat.\n\nThe dog ran to the park and "
                       "played with a red ball.\n\nTom and Sue ate cake.\n")
    before = four_results(model_dir, stories)

    real = trm.act_loss

    def doubled(outputs, labels, *args, **kwargs):  # twice the loss, and a large temporary
        total, metrics = real(outputs, labels, *args, **kwargs)
        temporary = mx.sum(mx.arange(EXTRA_BYTES // 4, dtype=mx.float32)) * 0.0
        return 2 * total + temporary, {**metrics, "token_ce_sum": 2 * metrics["token_ce_sum"]}

    # every binding of the one function: a caller with a copy of its own would not change
    bound = [m for m in list(sys.modules.values()) if getattr(m, "act_loss", None) is real]
    for module in bound:
        monkeypatch.setattr(module, "act_loss", doubled)
    after = four_results(model_dir, stories)

    assert after["train"] == pytest.approx(2 * before["train"], rel=1e-5)
    assert after["probe"] >= before["probe"] + EXTRA_BYTES // 2
    assert after["evaluate"] == pytest.approx(2 * before["evaluate"], rel=1e-5)
    assert after["adaptive"] == pytest.approx(2 * before["adaptive"], rel=1e-5)
