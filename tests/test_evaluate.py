"""mlx_trm.evaluate: held-out cross-entropy of a model directory, and the collapse warning."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from mlx_trm.checkpoint import load, save
from mlx_trm.cli.evaluate import main
from mlx_trm.training.evaluation import COLLAPSE_NOTE, evaluate_model
from tests.conftest import save_small_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp("eval") / "model", seq_len=32)


def test_cli_prints_what_evaluate_model_returns(model_dir, tinystories_dir, capsys):
    main(["--model", str(model_dir), "--data", str(tinystories_dir), "--max-stories", "6"])
    out = capsys.readouterr().out
    model, tokenizer = load(model_dir)
    result = evaluate_model(model, tokenizer, str(tinystories_dir), max_stories=6,
                            progress=False)
    assert result["stories"] == 6 and result["tokens"] > 100
    assert f"token cross-entropy: {result['token_ce']:.4f} nats" in out
    assert math.log(10000) - 1 < result["token_ce"] < math.log(10000) + 2  # random init
    assert f"latent spread: {result['latent_spread']:.3g}" in out
    assert result["latent_spread"] > 0.01 and COLLAPSE_NOTE not in out


def test_test_time_recursion_override_changes_the_result(model_dir, tinystories_dir, capsys):
    def ce(*extra):
        main(["--model", str(model_dir), "--data", str(tinystories_dir), "--max-stories", "4",
              *extra])
        line = next(x for x in capsys.readouterr().out.splitlines() if "cross-entropy" in x)
        return float(line.split()[2])

    assert ce("--halt-max-steps", "1") != ce()  # the small model was made with 2 steps


def test_a_collapsed_model_gets_the_note(model_dir, tinystories_dir, tmp_path, capsys):
    model, tokenizer = load(model_dir)
    model.embed_tokens.embedding_weight = mx.zeros_like(model.embed_tokens.embedding_weight)
    save(tmp_path / "collapsed", model, tokenizer)
    main(["--model", str(tmp_path / "collapsed"), "--data", str(tinystories_dir),
          "--max-stories", "4"])
    assert COLLAPSE_NOTE in capsys.readouterr().out
