"""The memory-saving paths give the plain paths' numbers, and use less memory doing it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_trm.config import ConfigError, ModelConfig, load_config
from mlx_trm.models import act_loss, act_step, build_model, initial_carry
from mlx_trm.models.loss import (
    cross_entropy,
    linear_cross_entropy,
    weighted_linear_cross_entropy,
)
from mlx_trm.models.router import RoutingLog, routers
from mlx_trm.training.memory import (
    _probe_peak,
    device_memory_limit,
    fit_memory,
    fitting_accum,
    probe_rows,
    step_peak,
)
from tests.conftest import CONFIGS


def small_model(**overrides) -> nn.Module:
    base = dict(vocab_size=97, hidden_size=16, num_heads=2, expansion=2, L_layers=2,
                H_cycles=2, L_cycles=2, halt_max_steps=2, halt_exploration_prob=0.0)
    base.update(overrides)
    mx.random.seed(0)
    return build_model(ModelConfig(**base))


def loss_and_grads(model, x, labels, *, plain: bool, chunk_rows: int | None = None,
                   training: bool = False):
    """act_loss through the chunked read-out, or through the full logits (``plain``);
    ``training`` builds the read-out's gradient in the forward, as the training step does."""
    moe = model.args.use_moeut

    def loss_fn(model):
        record = RoutingLog() if moe else None
        carry = initial_carry(model, *x.shape)
        _, outputs = act_step(model, carry, x, labels, training=True, record=record,
                              key=mx.random.key(1))
        if plain:
            outputs = {k: v for k, v in outputs.items() if k not in ("hidden", "head")}
        total, metrics = act_loss(outputs, labels, chunk_rows, training=training)
        if moe:
            total = total + record.entropy_reg()
            metrics["counts"] = record.counts(routers(model))
        return total, metrics

    (total, metrics), grads = nn.value_and_grad(model, loss_fn)(model)
    mx.eval(total, metrics, grads)
    return total, metrics, dict(tree_flatten(grads))


def assert_same(a, b, rtol=1e-5):
    (total_a, metrics_a, grads_a), (total_b, metrics_b, grads_b) = a, b
    assert float(total_a) == pytest.approx(float(total_b), rel=rtol)
    for key in ("correct", "exact", "n_tokens"):
        assert int(metrics_a[key]) == int(metrics_b[key]), key
    assert float(metrics_a["token_ce_sum"]) == pytest.approx(float(metrics_b["token_ce_sum"]),
                                                             rel=rtol)
    assert grads_a.keys() == grads_b.keys()
    for key, g in grads_a.items():
        scale = float(mx.abs(grads_b[key]).max()) + 1e-12
        assert float(mx.abs(g - grads_b[key]).max()) <= rtol * scale, key


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 29, 30, 1000])
def test_chunked_cross_entropy_gives_the_plain_loss_and_gradients(chunk_rows):
    """B*T = 30 rows: chunks of 7, 16 and 29 leave a ragged last chunk; 30 and 1000 take every
    row in one chunk, the logits kept whole (the path small batches take)."""
    model = small_model()
    x = mx.random.randint(1, 97, (3, 10), key=mx.random.key(2))
    labels = mx.where(mx.arange(10) < 2, -100, x)  # some ignored positions
    plain = loss_and_grads(model, x, labels, plain=True)
    assert float(mx.abs(plain[2]["embed_tokens.embedding_weight"]).max()) > 0
    assert_same(loss_and_grads(model, x, labels, plain=False, chunk_rows=chunk_rows), plain)


@pytest.mark.parametrize("chunk_rows", [1, 7, 29, 1000])
def test_training_loss_with_its_gradient_in_the_forward_gives_the_plain_numbers(chunk_rows):
    model = small_model()
    x = mx.random.randint(1, 97, (3, 10), key=mx.random.key(2))
    labels = mx.where(mx.arange(10) < 2, -100, x)
    plain = loss_and_grads(model, x, labels, plain=True)
    assert_same(loss_and_grads(model, x, labels, plain=False, chunk_rows=chunk_rows,
                               training=True), plain)


def test_weighted_linear_cross_entropy_is_the_weighted_sum_and_its_gradient():
    h = mx.random.normal((5, 6, 8), key=mx.random.key(0))
    w = mx.random.normal((33, 8), key=mx.random.key(1))
    y = mx.random.randint(0, 33, (5, 6), key=mx.random.key(2))
    row_w = mx.random.uniform(shape=(5, 6), key=mx.random.key(3))

    def plain(h, w):
        return (cross_entropy(h @ w.T, y) * row_w).sum()

    def fused(h, w):
        return weighted_linear_cross_entropy(h, w, y, row_w, chunk_rows=4)[0]

    (value, grads), (want, want_grads) = (mx.value_and_grad(f, argnums=(0, 1))(h, w)
                                          for f in (fused, plain))
    assert float(value) == pytest.approx(float(want), rel=1e-6)
    for g, g_want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.array(g), np.array(g_want), rtol=1e-5, atol=1e-6)
    _, ce, argmax = weighted_linear_cross_entropy(h, w, y, row_w, chunk_rows=4)
    np.testing.assert_allclose(np.array(ce), np.array(cross_entropy(h @ w.T, y)), rtol=1e-5)
    assert mx.array_equal(argmax, mx.argmax(h @ w.T, axis=-1))
    with pytest.raises(ValueError, match="chunk_rows"):
        weighted_linear_cross_entropy(h, w, y, row_w, chunk_rows=0)


def test_linear_cross_entropy_matches_logits_and_argmax_exactly_where_it_can():
    h = mx.random.normal((50, 8), key=mx.random.key(0))
    w = mx.random.normal((33, 8), key=mx.random.key(1))
    y = mx.random.randint(0, 33, (50,), key=mx.random.key(2))
    ce, argmax = linear_cross_entropy(h, w, y, chunk_rows=9)
    logits = h @ w.T
    np.testing.assert_allclose(np.array(ce), np.array(cross_entropy(logits, y)), rtol=1e-5)
    assert mx.array_equal(argmax, mx.argmax(logits, axis=-1))
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, w, y, chunk_rows=0)


def test_chunked_loss_never_holds_the_full_logits():
    N, D, V = 2048, 32, 2000  # full logits: 16 MB; a 128-row chunk's: 1 MB
    h = mx.random.normal((N, D), key=mx.random.key(0))
    w = mx.random.normal((V, D), key=mx.random.key(1)) * 0.1
    y = mx.random.randint(0, V, (N,), key=mx.random.key(2))

    def peak(fn):
        mx.eval(h, w, y)
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(mx.value_and_grad(fn, argnums=(0, 1))(h, w))
        return mx.get_peak_memory() - before

    ones = mx.ones((N,))
    plain = peak(lambda h, w: cross_entropy(h @ w.T, y).sum())
    chunked = peak(lambda h, w: linear_cross_entropy(h, w, y, chunk_rows=128)[0].sum())
    fused = peak(lambda h, w: weighted_linear_cross_entropy(h, w, y, ones, chunk_rows=128)[0])
    assert plain > 2 * N * V * 4  # logits and softmax at least
    assert chunked < plain / 4
    assert fused < plain / 4


@pytest.mark.parametrize("kind", [{}, {"flat_transformer": True}, {"use_moeut": True}])
@pytest.mark.usefixtures("kernels")  # both sets of branches (conftest.py)
def test_checkpointed_activations_give_the_same_loss_and_gradients(kind):
    model = small_model(**kind)
    x = mx.random.randint(1, 97, (2, 9), key=mx.random.key(3))
    plain = loss_and_grads(model, x, x, plain=False)
    model.checkpoint_activations = True
    ckpt = loss_and_grads(model, x, x, plain=False)
    assert_same(ckpt, plain)
    if model.args.use_moeut:  # the router calls still reach the record, values and counts
        assert plain[1]["counts"], "the MoE model recorded no router calls"
        for i, counts in enumerate(plain[1]["counts"]):
            assert mx.array_equal(ckpt[1]["counts"][i], counts), i


def test_fit_memory_turns_on_checkpointing_then_names_the_accumulation(capsys):
    # 16 rows of 256 tokens: enough that the 14 applications' activations outweigh the rest
    # (the probes run on 2 and 4 rows)
    config = load_config(CONFIGS / "trm_tinystories_1m.yaml",
                         ["model.seq_len=256", "train.global_batch_size=16"])
    model = build_model(config.model)
    off = fit_memory(model, config, warn=False, limit=10**12)
    assert off["checkpoint_activations"] is False and capsys.readouterr().err == ""
    config.train.checkpoint_activations = True
    on = fit_memory(model, config, warn=False, limit=10**12)
    assert on["estimated_peak_gb"] < off["estimated_peak_gb"] * 0.8
    # auto: a limit between the two peaks turns checkpointing on, silently
    config.train.checkpoint_activations = None
    limit = int((on["estimated_peak_gb"] + off["estimated_peak_gb"]) / 2 * 1e9)
    auto = fit_memory(model, config, limit=limit)
    assert auto["checkpoint_activations"] is True and model.checkpoint_activations
    assert capsys.readouterr().err == ""
    # too small even so: a warning that names the accumulation that fits
    fit_memory(model, config, limit=int(on["estimated_peak_gb"] * 0.7e9))
    err = capsys.readouterr().err
    assert err.startswith("warning: a training step needs about") and err.count("\n") == 1
    assert "train.grad_accum_steps=" in err


def test_the_device_report_decides_the_limit_and_the_checkpointing(kernels, monkeypatch, capsys):
    """Apple silicon's branch fits the step into the GPU's recommended working set from the
    device report (faked: this machine has no GPU), the Linux CPU's into the machine's RAM. A
    working set between the step's peaks with and without recomputation turns it on."""
    config = load_config(CONFIGS / "trm_tinystories_1m.yaml",
                         ["model.seq_len=64", "train.global_batch_size=8"])
    model = small_model(hidden_size=32, expansion=8, L_cycles=3, H_cycles=1)
    config.train.checkpoint_activations = False
    off = fit_memory(model, config, warn=False, limit=10**12)
    config.train.checkpoint_activations = True
    on = fit_memory(model, config, warn=False, limit=10**12)
    working_set = int((on["estimated_peak_gb"] + off["estimated_peak_gb"]) / 2 * 1e9)
    monkeypatch.setattr(mx, "device_info", lambda: {
        "device_name": "Apple M2", "architecture": "applegpu_g14g",
        "memory_size": 16 * 2**30, "max_recommended_working_set_size": working_set})
    limit, source = device_memory_limit()
    config.train.checkpoint_activations = None
    auto = fit_memory(model, config, warn=False)
    if kernels == "metal":
        assert (limit, source) == (working_set, "the GPU's recommended working set")
        assert auto["checkpoint_activations"] is True and model.checkpoint_activations
    else:
        assert source == "the machine's RAM" and limit > 10 * working_set
        assert auto["checkpoint_activations"] is False
    assert auto["limit_gb"] == limit / 1e9 and capsys.readouterr().err == ""


def test_fitting_accum_is_the_fewest_micro_batches_that_fit():
    assert fitting_accum(1.0, 1.0, 8, 9.0) == 1
    assert fitting_accum(1.0, 1.0, 8, 5.0) == 2
    assert fitting_accum(1.0, 1.0, 6, 2.5) == 6  # 4 does not divide 6
    assert fitting_accum(1.0, 1.0, 8, 1.5) is None


def test_checkpoint_activations_setting_is_typed(tmp_path):
    path = CONFIGS / "trm_tinystories_1m.yaml"
    assert load_config(path).train.checkpoint_activations is None
    assert load_config(path, ["train.checkpoint_activations=true"]).train.checkpoint_activations
    with pytest.raises(ConfigError, match="checkpoint_activations must be bool"):
        load_config(path, ["train.checkpoint_activations=sometimes"])


def activation_peak(model, rows=2, seq_len=256) -> int:
    return _probe_peak(model, rows, seq_len, chunk_rows=64)


def test_checkpointing_keeps_about_one_layer_application_alive():
    """From 4 to 12 back-propagated layer applications the stored activations grow by 8
    applications' worth; recomputed, only by the applications' inputs."""
    growth = {}
    for checkpoint in (False, True):
        peaks = []
        for L_cycles in (1, 5):
            model = small_model(hidden_size=32, expansion=8, L_cycles=L_cycles, H_cycles=1)
            model.checkpoint_activations = checkpoint
            peaks.append(activation_peak(model))
        growth[checkpoint] = peaks[1] - peaks[0]
    assert growth[True] < growth[False] / 5


def test_no_gradient_cycles_hold_no_activations():
    """H_cycles=3 runs two more cycles without gradient: the peak stays that of H_cycles=1."""
    one = activation_peak(small_model(hidden_size=32, expansion=8, L_cycles=3, H_cycles=1))
    three = activation_peak(small_model(hidden_size=32, expansion=8, L_cycles=3, H_cycles=3))
    assert three < one * 1.15


def test_the_estimate_extrapolates_from_smaller_micro_batches_to_the_measured_peak():
    """The estimate for 32 rows, from probes on 4 and 8 (an eighth and a quarter), lands near
    the peak measured on all 32 rows."""
    assert probe_rows(1) == (1, 2) and probe_rows(15) == (1, 2) and probe_rows(64) == (8, 16)
    model = small_model(hidden_size=32, expansion=8, L_cycles=3, H_cycles=1, vocab_size=2000)
    fixed, per_row = step_peak(model, 32, 128)
    measured = _probe_peak(model, 32, 128, chunk_rows=1024)
    assert 0.8 * measured < fixed + 32 * per_row < 1.25 * measured
