"""Adaptive recursion per token: cached decoding equals the teacher-forced evaluation, threshold 0
is today's fixed depth, halted tokens skip their steps, bad flags get one-line errors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_trm.config import ConfigError
from mlx_trm.generation.adaptive import AdaptiveDecoder, adaptive_forward, halt_policy
from mlx_trm.training.evaluation import evaluate_adaptive
from tests.conftest import save_small_model
from tests.test_generate import run_cli, small_model

# thresholds at which the small random models halt some positions early and not others
MIXED = {"kl": 0.3, "latent": 0.8, "q": 0.0}
ROWS = [[5, 17, 3, 42, 8, 61, 9, 30, 2, 77, 14, 50, 6, 91, 23, 40],
        [11, 4, 70, 33, 12, 58, 19, 85, 7, 26, 64, 3, 48, 90, 15, 2]]


def act_model(kind: str = "dense_act", **overrides):
    model = small_model(kind, **overrides)
    # a random q head, so that q_continue - q_halt differs between positions (it is 0 at init)
    model.q_head.weight = mx.random.normal(model.q_head.weight.shape, key=mx.random.key(3))
    model.q_head.bias = mx.array([0.0, 0.3])
    return model


def decode_rows(model, rows, prefill: int, policy, compile: bool) -> np.ndarray:
    """Logits at positions prefill-1 .. end: prefill ``rows[:, :prefill]``, then feed the rest."""
    decode = AdaptiveDecoder(model, [r[:prefill] for r in rows], len(rows[0]), policy=policy,
                             compile=compile)
    out = [decode.prefill()] + [decode(mx.array([r[t] for r in rows]))
                                for t in range(prefill, len(rows[0]))]
    return np.array(mx.stack(out, axis=1))


@pytest.mark.parametrize("kind", ["dense_act", "moeut_act"])
@pytest.mark.parametrize("criterion", ["kl", "latent", "q"])
def test_adaptive_decoding_equals_teacher_forced_evaluation(kind, criterion):
    model = act_model(kind, halt_max_steps=3)
    policy = halt_policy(model, criterion, MIXED[criterion])
    logits, steps = adaptive_forward(model, mx.array(ROWS), policy)
    steps = np.array(steps)
    # the test means something only if positions halted at different steps
    assert len(np.unique(steps)) > 1, steps
    expected = np.array(logits)
    for rows, compile in (([ROWS[0]], True), (ROWS, True), (ROWS, False)):
        policy = halt_policy(model, criterion, MIXED[criterion])
        got = decode_rows(model, rows, 4, policy, compile)
        assert np.abs(got - expected[:len(rows), 3:]).max() <= 1e-4
        # the decoder ran exactly the ACT steps the evaluation counts for these positions
        assert policy.act_steps == steps[:len(rows), 4:].sum()
        assert policy.tokens == len(rows) * (len(ROWS[0]) - 4)


@pytest.mark.parametrize("criterion", ["kl", "latent"])
def test_threshold_zero_is_todays_fixed_depth_exactly(criterion):
    model = act_model("dense_act", halt_max_steps=3)
    policy = halt_policy(model, criterion, 0.0)
    logits, steps = adaptive_forward(model, mx.array(ROWS), policy)
    assert np.array_equal(np.array(logits), np.array(model(mx.array(ROWS))))
    assert (np.array(steps) == 3).all()


@pytest.mark.parametrize("criterion", ["kl", "latent"])
def test_threshold_zero_evaluation_is_todays_cross_entropy(criterion, tmp_path):
    from mlx_trm.checkpoint import load
    from mlx_trm.training.evaluation import evaluate_model

    model, tok = load(save_small_model(tmp_path / "m", seq_len=32))
    stories = tmp_path / "stories.txt"
    stories.write_text("Once upon a time there was a cat.\n\nThe dog ran to the park and "
                       "played with a red ball.\n\nTom and Sue ate cake.\n")
    today = evaluate_model(model, tok, str(stories), progress=False, batch_size=2)
    adaptive = evaluate_adaptive(model, tok, str(stories), halt_policy(model, criterion, 0.0),
                                 batch_size=2)
    assert adaptive["tokens"] == today["tokens"]
    assert adaptive["token_ce"] == today["token_ce"]
    assert adaptive["act_steps_per_token"] == model.args.halt_max_steps


def test_min_steps_and_a_high_threshold_halt_every_token_at_min_steps():
    model = act_model("dense_act", halt_max_steps=4)
    for m in (1, 2, 4):
        _, steps = adaptive_forward(model, mx.array(ROWS), halt_policy(model, "kl", 1e9, m))
        assert (np.array(steps) == m).all()


def test_halt_max_steps_above_the_trained_value_decodes_exactly():
    model = act_model("dense_act", halt_max_steps=6)  # as --halt-max-steps 6 on a 3-step model
    policy = halt_policy(model, "latent", 0.5)
    logits, steps = adaptive_forward(model, mx.array(ROWS[:1]), policy)
    assert np.array(steps).max() > 3
    got = decode_rows(model, ROWS[:1], 2, halt_policy(model, "latent", 0.5), True)
    assert np.abs(got - np.array(logits)[:, 1:]).max() <= 1e-4


@pytest.mark.parametrize("args, fix", [
    (("klx", 0.1, 1), "did you mean 'kl'"),
    (("entropy", 0.1, 1), "choose one of kl, latent, q"),
    (("kl", -0.5, 1), "must be >= 0"),
    (("kl", 0.1, 4), "lower it or raise --halt-max-steps"),
    (("kl", 0.1, 0), "between 1 and"),
])
def test_bad_settings_are_one_line_errors_naming_the_fix(args, fix):
    model = act_model("dense_act")  # 3 ACT steps
    with pytest.raises(ConfigError, match=fix) as e:
        halt_policy(model, *args)
    assert "\n" not in str(e.value)


def test_a_one_step_model_refuses_adaptive_halting():
    with pytest.raises(ConfigError, match="pass --halt-max-steps N"):
        halt_policy(small_model("dense"), "kl", 0.1)
    flat = small_model("flat")
    flat.args.halt_max_steps = 2  # --halt-max-steps 2 on the demo: still nothing to halt
    with pytest.raises(ConfigError, match="flat transformer .*drop --adaptive-halt"):
        halt_policy(flat, "kl", 0.1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp("adaptive") / "model", seq_len=64)


def test_generate_cli_prints_act_steps_per_token(model_dir, capsys):
    out = run_cli(capsys, ["--model", str(model_dir), "--prompt", "Once upon a time", "-m", "8",
                           "--ignore-eos", "--adaptive-halt", "kl", "--halt-threshold", "1e9",
                           "--halt-max-steps", "4"]).out
    assert "Generation: 8 tokens" in out and "ACT steps per token: 1.00" in out


def test_cli_errors_are_one_line(model_dir, capsys):
    from mlx_trm.cli.generate import main

    for argv, fix in ((["--adaptive-halt", "kll"], "did you mean 'kl'"),
                      (["--halt-threshold", "0.1"], "add it or drop them"),
                      (["--adaptive-halt", "kl", "--min-halt-steps", "3"], "raise --halt-max"),
                      (["--adaptive-halt", "kl", "--halt-max-steps", "1"], "(N > 1)"),
                      (["--adaptive-halt", "kl", "--no-cache"], "drop --no-cache")):
        with pytest.raises(SystemExit):
            main(["--model", str(model_dir), "-m", "2", *argv])
        err = capsys.readouterr().err.strip()
        assert fix in err and "\n" not in err, err


def test_evaluate_cli_prints_act_steps_per_token(model_dir, tmp_path, capsys):
    from mlx_trm.cli.evaluate import main

    stories = tmp_path / "stories.txt"
    stories.write_text("Once upon a time there was a cat.\n\nThe dog ran to the park.\n")
    main(["--model", str(model_dir), "--data", str(stories), "--adaptive-halt", "latent",
          "--halt-threshold", "0"])
    out = capsys.readouterr().out
    assert "token cross-entropy" in out and "ACT steps per token: 2.00" in out
