"""The dense model zoo: parameter counts, causality, ACT carry, loss, gradients, init, compile."""

from __future__ import annotations

import math
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_trm.cli.generate import main as generate_main
from mlx_trm.config import ConfigError, ModelConfig, load_config
from mlx_trm.kernels import ENV, metal_kernels
from mlx_trm.models import act_loss, act_step, build_model, initial_carry, layers
from mlx_trm.models.layers import swiglu_intermediate_size
from tests.conftest import CONFIGS

DENSE = ["trm_tinystories_1m_flat", "trm_tinystories_1m", "trm_tinystories_1m_noact",
         "trm_tinystories_1m_noact_1l"]


def reference_model(name: str, **overrides) -> nn.Module:
    config = load_config(CONFIGS / f"{name}.yaml").model
    for key, value in overrides.items():
        setattr(config, key, value)
    mx.random.seed(0)
    return build_model(config)


def small_config(**overrides) -> ModelConfig:
    """A few-thousand-parameter dense TRM for fast behavioural tests."""
    base = dict(vocab_size=97, hidden_size=16, num_heads=2, expansion=2, L_layers=2,
                H_cycles=1, L_cycles=2, halt_max_steps=3, halt_exploration_prob=0.0)
    base.update(overrides)
    return ModelConfig(**base)


def n_trainable(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


@pytest.mark.parametrize("name,count", [
    ("trm_tinystories_1m_flat", 1_033_346), ("trm_tinystories_1m", 1_066_114),
    ("trm_tinystories_1m_noact", 1_066_114), ("trm_tinystories_1m_noact_1l", 1_066_114),
    ("trm_tinystories_1m_moeut", 1_084_038), ("trm_tinystories_1m_moeut_act", 1_084_038),
    ("trm_tinystories_1m_moeut_noact", 1_084_038), ("trm_tinystories_10m_moeut", 10_650_758),
])
def test_parameter_counts_match_reference(name, count):
    model = reference_model(name)
    assert n_trainable(model) == count
    # the tied embedding is one parameter, and the buffers are not trainable
    keys = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert "embed_tokens.embedding_weight" in keys
    assert not any("lm_head" in k or "_init" in k or "expert_bias" in k or "target_std" in k
                   for k in keys)


def test_swiglu_width_rounding():
    assert swiglu_intermediate_size(64, 20) == 1024
    assert swiglu_intermediate_size(64, 4) == 256
    assert swiglu_intermediate_size(512, 4) == 1536


def logits_per_act_step(model, inputs):
    B, T = inputs.shape
    z_H, z_L = model.initial_latents(B, T)
    out = []
    for _ in range(model.args.halt_max_steps):
        z_H, z_L, logits, _ = model.inner(z_H, z_L, inputs)
        out.append(np.array(logits))
    return out


@pytest.mark.parametrize("scalar_exp,query_block", [(True, 128), (True, 4), (False, 128)])
def test_the_model_exp_softmax_silu_and_attention_match_mlx_and_their_gradients(
        monkeypatch, scalar_exp, query_block):
    """The power-of-two exp (taken on the CPU off macOS) and MLX's own ops agree, forward and
    backward, on both sides of the switch; causal attention in one block or in blocks of 4
    queries (4 + 4 + 1 of 9)."""
    monkeypatch.setenv(ENV, "cpu" if scalar_exp else "metal")
    monkeypatch.setattr(layers, "SMALL", 1)
    monkeypatch.setattr(layers, "QUERY_BLOCK", query_block)
    x = mx.random.normal((4, 33), key=mx.random.key(0)) * 8
    np.testing.assert_allclose(np.array(layers.exp(x)), np.exp(np.array(x, np.float64)),
                               rtol=2e-6)
    np.testing.assert_allclose(np.array(layers.softmax(x)), np.array(mx.softmax(x, axis=-1)),
                               rtol=1e-5, atol=1e-7)
    w = mx.random.normal((4, 33), key=mx.random.key(1))
    for ours, stock in [(layers.silu, nn.silu), (layers.softmax, lambda v: mx.softmax(v, -1))]:
        (a, ga), (b, gb) = (mx.value_and_grad(lambda v, f=f: (f(v) * w).sum())(x)
                            for f in (ours, stock))
        assert float(a) == pytest.approx(float(b), rel=1e-5)
        np.testing.assert_allclose(np.array(ga), np.array(gb), rtol=1e-4, atol=1e-5)
    q, k, v, d = (mx.random.normal((2, 2, 9, 4), key=mx.random.key(i)) for i in range(4))

    def attend(f):
        return mx.value_and_grad(lambda q, k, v: (f(q, k, v) * d).sum(), argnums=(0, 1, 2))

    ours = attend(lambda q, k, v: layers.attention(q, k, v, scale=0.5))(q, k, v)
    stock = attend(lambda q, k, v: mx.fast.scaled_dot_product_attention(
        q, k, v, scale=0.5, mask="causal"))(q, k, v)
    assert float(ours[0]) == pytest.approx(float(stock[0]), rel=1e-5)
    for a, b in zip(ours[1], stock[1], strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)
    # the last 3 of 9 positions (a prefill after cached keys)
    np.testing.assert_allclose(
        np.array(layers.masked_attention(q[:, :, -3:], k, v, 0.5, "causal")),
        np.array(mx.fast.scaled_dot_product_attention(q[:, :, -3:], k, v, scale=0.5,
                                                       mask="causal")), rtol=1e-5, atol=1e-6)
    hide = mx.random.uniform(shape=(2, 1, 9, 9), key=mx.random.key(5)) < 0.3
    hide = hide & ~mx.eye(9, dtype=mx.bool_)  # every query keeps one key
    np.testing.assert_allclose(
        np.array(layers.attention(q, k, v, 0.5, cache=_FixedMask(~hide))),
        np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask=~hide)),
        rtol=1e-5, atol=1e-6)


def test_mlx_trm_kernels_picks_the_branches_and_refuses_other_values(monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)  # unset: the device decides (the CPU here)
    on_linux_cpu = mx.default_device() == mx.cpu and sys.platform != "darwin"
    assert layers.exp_is_scalar() is on_linux_cpu
    assert metal_kernels() is (mx.default_device() != mx.cpu)
    for value, metal in (("metal", True), ("cpu", False)):
        monkeypatch.setenv(ENV, value)
        assert layers.exp_is_scalar() is not metal and metal_kernels() is metal
    monkeypatch.setenv(ENV, "gpu")
    with pytest.raises(ConfigError, match="use MLX_TRM_KERNELS=metal .* MLX_TRM_KERNELS=cpu"):
        layers.exp_is_scalar()
    with pytest.raises(SystemExit) as e:  # a CLI says so in one line before any work
        generate_main(["--prompt", "Once", "--max-tokens", "2"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: MLX_TRM_KERNELS='gpu' is not a choice")


@pytest.mark.parametrize("scalar_exp", [True, False])
def test_swiglu_backward_keeps_only_the_sigmoid_and_matches_autodiff(monkeypatch, scalar_exp):
    """The SwiGLU's own backward gives autodiff's gradients and keeps one [.., inter] array per
    application (autodiff keeps four) through a stack of applications sharing the weights."""
    monkeypatch.setenv(ENV, "cpu" if scalar_exp else "metal")
    mlp = layers.SwiGLU(16, 4)  # 256 wide
    x = mx.random.normal((4, 128, 16), key=mx.random.key(0))

    def autodiff(h):
        gate, up = mx.split(mlp.gate_up_proj(h), 2, axis=-1)
        return mlp.down_proj(nn.silu(gate) * up)

    def step(f, n):
        def loss(params, h):
            mlp.update(params)
            for _ in range(n):
                h = h + 0.1 * f(h)
            return (h * mx.cos(h)).sum()
        return mx.value_and_grad(loss, argnums=(0, 1))

    params = mlp.trainable_parameters()
    ours, stock = step(mlp, 3)(params, x), step(autodiff, 3)(params, x)
    for (_, a), (_, b) in zip(tree_flatten(ours), tree_flatten(stock), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)

    def growth(f):  # peak bytes per extra application, between 6 and 10 applications
        peaks = []
        for n in (6, 10):
            g = step(f, n)
            mx.eval(g(params, x))
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            mx.eval(g(params, x))
            peaks.append(mx.get_peak_memory() - base)
        return (peaks[1] - peaks[0]) / 4

    sigmoid_bytes = 4 * 128 * 256 * 4
    assert growth(mlp) < 1.5 * sigmoid_bytes < 0.5 * growth(autodiff)


class _FixedMask:
    """A cache that stores nothing and hands attention a fixed boolean mask."""

    def __init__(self, mask):
        self.mask = mask

    def make_mask(self, n, **_):
        return self.mask

    def update_and_fetch(self, k, v):
        return k, v


@pytest.mark.parametrize("name", ["trm_tinystories_1m_flat", "trm_tinystories_1m",
                                  "trm_tinystories_1m_moeut_act"])
def test_causality_at_every_act_step(name):
    model = reference_model(name)
    T, t = 48, 30
    a = mx.random.randint(1, 10000, (2, T), key=mx.random.key(1))
    b = mx.concatenate([a[:, :t], mx.random.randint(1, 10000, (2, T - t),
                                                    key=mx.random.key(2))], axis=1)
    la, lb = logits_per_act_step(model, a), logits_per_act_step(model, b)
    assert len(la) == model.args.halt_max_steps
    for step_a, step_b in zip(la, lb):
        assert np.abs(step_a[:, :t] - step_b[:, :t]).max() <= 1e-6
        assert np.abs(step_a[:, t:] - step_b[:, t:]).max() > 1e-3  # the change is visible later


def test_causality_dense_trm_noact():
    model = reference_model("trm_tinystories_1m_noact")
    a = mx.random.randint(1, 10000, (1, 40), key=mx.random.key(3))
    b = a.at[0, 25:].add(1)
    la, lb = np.array(model(a)), np.array(model(b))
    assert np.abs(la[:, :25] - lb[:, :25]).max() <= 1e-6


def test_model_call_runs_exactly_halt_max_steps_and_returns_last_logits():
    mx.random.seed(0)
    model = build_model(small_config(halt_max_steps=3))
    x = mx.random.randint(1, 97, (2, 12))
    per_step = logits_per_act_step(model, x)
    np.testing.assert_allclose(np.array(model(x)), per_step[-1], atol=1e-6)
    assert np.abs(per_step[0] - per_step[-1]).max() > 1e-4  # refinement changes the logits


def test_act_carry_semantics_step_by_step():
    mx.random.seed(0)
    model = build_model(small_config(halt_max_steps=2))
    B, T = 3, 8
    batch1 = mx.random.randint(1, 97, (B, T), key=mx.random.key(10))
    batch2 = mx.random.randint(1, 97, (B, T), key=mx.random.key(11))
    labels1, labels2 = batch1 + 0, batch2 + 0

    carry = initial_carry(model, B, T)
    assert carry["halted"].tolist() == [True] * B
    carry, out = act_step(model, carry, batch1, labels1, training=False)
    # Step 1: every row reset to H_init/L_init and adopted batch 1.
    z_H, z_L = model.initial_latents(B, T)
    ref_zH, ref_zL, ref_logits, _ = model.inner(z_H, z_L, batch1)
    np.testing.assert_allclose(np.array(out["logits"]), np.array(ref_logits), atol=1e-6)
    assert carry["steps"].tolist() == [1, 1, 1]
    assert carry["halted"].tolist() == [False] * B
    assert mx.array_equal(carry["inputs"], batch1)

    # Step 2: rows are not halted, so batch 2 is dropped and refinement continues on batch 1.
    carry, out = act_step(model, carry, batch2, labels2, training=False)
    _, _, ref_logits2, _ = model.inner(ref_zH, ref_zL, batch1)
    np.testing.assert_allclose(np.array(out["logits"]), np.array(ref_logits2), atol=1e-6)
    assert mx.array_equal(carry["inputs"], batch1) and mx.array_equal(carry["labels"], labels1)
    assert carry["steps"].tolist() == [2, 2, 2]
    assert carry["halted"].tolist() == [True] * B  # halt_max_steps reached

    # Step 3: all halted rows restart on the newly offered batch.
    carry, out = act_step(model, carry, batch2, labels2, training=False)
    assert mx.array_equal(carry["inputs"], batch2)
    assert carry["steps"].tolist() == [1, 1, 1]


def test_act_mixed_rows_reset_independently():
    mx.random.seed(0)
    model = build_model(small_config(halt_max_steps=3))
    B, T = 2, 6
    b1 = mx.random.randint(1, 97, (B, T), key=mx.random.key(1))
    b2 = mx.random.randint(1, 97, (B, T), key=mx.random.key(2))
    carry, _ = act_step(model, initial_carry(model, B, T), b1, b1, training=False)
    carry["halted"] = mx.array([True, False])  # row 0 halted, row 1 still refining
    z_H_row1 = np.array(carry["z_H"][1])
    carry, _ = act_step(model, carry, b2, b2, training=False)
    assert carry["inputs"][0].tolist() == b2[0].tolist()  # row 0 adopted the new row
    assert carry["inputs"][1].tolist() == b1[1].tolist()  # row 1 kept its data
    assert carry["steps"].tolist() == [1, 2]
    # row 1 continued from its carried latent, row 0 restarted from H_init
    z_H, z_L = model.initial_latents(1, T)
    ref_row0, *_ = model.inner(z_H, z_L, b2[:1])
    # atol: a 2-row and a 1-row matmul may round differently (BLAS kernels depend on M)
    np.testing.assert_allclose(np.array(carry["z_H"][0]), np.array(ref_row0[0]), atol=1e-5)
    assert np.abs(np.array(carry["z_H"][1]) - z_H_row1).max() > 1e-4


def test_training_halting_uses_q_head_and_exploration():
    mx.random.seed(0)
    model = build_model(small_config(halt_max_steps=4))
    B, T = 64, 4
    x = mx.random.randint(1, 97, (B, T))
    model.q_head.bias = mx.array([5.0, -5.0])  # q_halt > 0 everywhere

    # Evaluation ignores q_halt: exactly halt_max_steps steps.
    carry = initial_carry(model, B, T)
    for step in range(1, 5):
        carry, _ = act_step(model, carry, x, x, training=False)
        assert carry["halted"].tolist() == [step == 4] * B

    # Training without exploration halts after one step when q_halt > 0.
    carry, _ = act_step(model, initial_carry(model, B, T), x, x, training=True)
    assert all(carry["halted"].tolist())

    # With exploration probability 1 every row runs at least 2 steps (min_halt in [2, N]).
    model.args.halt_exploration_prob = 1.0
    carry, _ = act_step(model, initial_carry(model, B, T), x, x, training=True)
    assert not any(carry["halted"].tolist())
    halted_at = np.zeros(B, dtype=int)
    for step in range(2, 5):
        carry, _ = act_step(model, carry, x, x, training=True)
        newly = np.array(carry["halted"]) & (halted_at == 0)
        halted_at[newly] = step
        carry["halted"] = mx.array(np.array(carry["halted"]))
    assert set(halted_at.tolist()) <= {2, 3, 4} and len(set(halted_at.tolist())) > 1

    # Without q_halt > 0 and without exploration, training also runs the full N steps.
    model.args.halt_exploration_prob = 0.0
    model.q_head.bias = mx.array([-5.0, -5.0])
    carry = initial_carry(model, B, T)
    for step in range(1, 5):
        carry, _ = act_step(model, carry, x, x, training=True)
        assert carry["halted"].tolist() == [step == 4] * B


def test_halt_max_steps_one_never_uses_q_head():
    mx.random.seed(0)
    model = build_model(small_config(halt_max_steps=1, halt_exploration_prob=0.5))
    x = mx.random.randint(1, 97, (4, 5))
    model.q_head.bias = mx.array([-5.0, -5.0])
    carry, _ = act_step(model, initial_carry(model, 4, 5), x, x, training=True)
    assert all(carry["halted"].tolist())


def test_loss_head_matches_reference_definition():
    V = 5
    logits = mx.array(np.random.default_rng(0).normal(size=(3, 4, V)).astype(np.float32))
    argmax = np.array(mx.argmax(logits, axis=-1))
    labels = argmax.astype(np.int32)  # row 0: all correct -> exact
    labels[1, 2] = (argmax[1, 2] + 1) % V  # row 1: one wrong -> not exact
    labels[1, 3] = -100
    labels[2, :] = -100  # row 2: nothing to predict -> exact (n = 0)
    q_halt = mx.array([0.3, -1.0, 2.0])
    total, metrics = act_loss({"logits": logits, "q_halt_logits": q_halt}, mx.array(labels))

    lp = np.array(logits) - np.log(np.exp(np.array(logits)).sum(-1, keepdims=True))
    lm = 0.0
    for b in range(3):
        mask = labels[b] != -100
        if mask.sum():
            lm += -lp[b, mask, labels[b, mask]].mean()
    exact = np.array([1.0, 0.0, 1.0])
    q = np.array(q_halt)
    bce = (np.maximum(q, 0) - q * exact + np.log1p(np.exp(-np.abs(q)))).sum()
    assert float(metrics["lm_loss"]) == pytest.approx(lm, rel=1e-5)
    assert float(metrics["q_halt_loss"]) == pytest.approx(bce, rel=1e-5)
    assert float(total) == pytest.approx(lm + 0.5 * bce, rel=1e-5)
    assert int(metrics["exact"]) == 2 and int(metrics["n_tokens"]) == 7


def test_gradient_flows_only_through_the_last_h_cycle():
    mx.random.seed(0)
    model = build_model(small_config(H_cycles=3, L_cycles=2, halt_max_steps=1))
    B, T = 2, 6
    x = mx.random.randint(1, 97, (B, T))

    def loss_through_model(model):
        z_H, z_L = model.initial_latents(B, T)
        _, _, logits, _ = model.inner(z_H, z_L, x)
        return (logits ** 2).mean()

    def manual(model, detach_early: bool):
        # The H_cycles - 1 early cycles computed by hand, then the graded last cycle.
        z_H, z_L = model.initial_latents(B, T)
        emb = model.embed_scale * model.embed_tokens(x)
        for _ in range(model.args.H_cycles - 1):
            for _ in range(model.args.L_cycles):
                z_L = model.L_level(z_L, z_H + emb)
            z_H = model.L_level(z_H, z_L)
        if detach_early:
            z_H, z_L = mx.array(np.array(z_H)), mx.array(np.array(z_L))  # true constants
        for _ in range(model.args.L_cycles):
            z_L = model.L_level(z_L, z_H + emb)
        z_H = model.L_level(z_H, z_L)
        return (model.embed_tokens.as_linear(z_H) ** 2).mean()

    g_model = nn.value_and_grad(model, loss_through_model)(model)[1]
    g_const = nn.value_and_grad(model, lambda m: manual(m, True))(model)[1]
    g_full = nn.value_and_grad(model, lambda m: manual(m, False))(model)[1]
    flat_model, flat_const, flat_full = (dict(tree_flatten(g)) for g in (g_model, g_const, g_full))
    key = "L_level.layers.0.mlp.gate_up_proj.weight"
    for k in flat_model:
        np.testing.assert_allclose(np.array(flat_model[k]), np.array(flat_const[k]), atol=1e-6)
    # and full backprop through the early cycles would have given a different gradient
    assert np.abs(np.array(flat_full[key]) - np.array(flat_model[key])).max() > 1e-5


def test_init_statistics_follow_reference_distributions():
    model = reference_model("trm_tinystories_1m")
    checks = {
        "embed_tokens.embedding_weight": 1 / 8,
        "L_level.layers.0.self_attn.qkv_proj.weight": 1 / 8,
        "L_level.layers.0.self_attn.o_proj.weight": 1 / 8,
        "L_level.layers.0.mlp.gate_up_proj.weight": 1 / 8,
        "L_level.layers.0.mlp.down_proj.weight": 1 / 32,
    }
    params = dict(tree_flatten(model.parameters()))
    for key, std in checks.items():
        w = np.array(params[key])
        assert w.std() == pytest.approx(std, rel=0.03), key
        assert abs(w.mean()) < 0.05 * std
        # truncated at two "raw" standard deviations: |w| <= 2 * std / 0.8796
        assert np.abs(w).max() <= 2 * std / 0.8796256610 + 1e-6
        assert np.abs(w).max() > 1.8 * std / 0.8796256610  # and really reaches the bound
    inits = np.concatenate([np.array(model.H_init), np.array(model.L_init)])
    assert 0.7 < inits.std() < 1.3 and np.abs(inits).max() <= 2 / 0.8796256610 + 1e-6
    assert np.all(np.array(model.q_head.weight) == 0)
    assert np.all(np.array(model.q_head.bias) == -5)


def make_loss_fn(model, batch_size):
    def loss_fn(carry, inputs, labels):
        carry, outputs = act_step(model, carry, inputs, labels, training=True)
        total, _ = act_loss(outputs, labels)
        return total / batch_size, carry

    return nn.value_and_grad(model, loss_fn)


@pytest.mark.parametrize("name", DENSE)
def test_compiled_forward_backward_matches_uncompiled(name):
    model = reference_model(name)
    B, T = 2, 24
    x = mx.random.randint(1, 10000, (B, T), key=mx.random.key(5))
    carry = initial_carry(model, B, T)
    step = make_loss_fn(model, B)
    state = [model.state, mx.random.state]
    compiled = mx.compile(step, inputs=state, outputs=state)

    results = []
    for fn in (step, compiled):
        mx.random.seed(7)
        c = carry
        for _ in range(2):  # two ACT steps: the second continues from the carry
            (loss, c), grads = fn(c, x, x)
        mx.eval(loss, grads)
        results.append((loss, grads, c))
    (l0, g0, c0), (l1, g1, c1) = results
    assert float(l0) == pytest.approx(float(l1), rel=1e-5)
    for (k, a), (_, b) in zip(tree_flatten(g0), tree_flatten(g1)):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=1e-4, err_msg=k)
    np.testing.assert_allclose(np.array(c0["z_H"]), np.array(c1["z_H"]), atol=1e-5)
    assert math.isfinite(float(l0))


def test_tied_embedding_gets_one_gradient_from_input_and_output():
    mx.random.seed(0)
    model = build_model(small_config(halt_max_steps=1))
    x = mx.random.randint(1, 97, (1, 5))
    grads = nn.value_and_grad(model, lambda m: m(x).sum())(model)[1]
    g = np.array(grads["embed_tokens"]["embedding_weight"])
    unused = np.setdiff1d(np.arange(97), np.array(x).ravel())
    # rows of tokens never seen still get gradient from the output head
    assert np.abs(g[unused]).max() > 0


def test_cached_prefill_and_decode_equal_full_forward():
    mx.random.seed(0)
    model = build_model(small_config(H_cycles=2, L_cycles=2, halt_max_steps=2))
    x = mx.random.randint(1, 97, (2, 20))
    full = np.array(model(x))
    cache = model.make_cache()
    assert len(cache) == 2 * 2 * 3 * 2
    pieces = [model(x[:, :7], cache=cache)]
    pieces += [model(x[:, t:t + 1], cache=cache) for t in range(7, 20)]
    cached = np.concatenate([np.array(p) for p in pieces], axis=1)
    np.testing.assert_allclose(cached, full, atol=1e-4)
    assert all(c.offset == 20 for c in cache)


def test_model_state_roundtrips_through_tree_map():
    model = reference_model("trm_tinystories_1m_noact_1l")
    params = tree_map(lambda a: a * 1, model.parameters())
    model.update(params)
    assert n_trainable(model) == 1_066_114
