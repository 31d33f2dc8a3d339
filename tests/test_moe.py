"""sigma-MoE and SwitchHead: gather path vs dense oracle (values and gradients), parameter counts,
init, causality, KV cache, bias balancing, selector renorm, entropy reg, counts, mx.compile."""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_trm.models.layers import rms_norm
from mlx_trm.models.moe import (
    SigmaMoE,
    SwitchHead,
    accumulate_expert_counts,
    detach_record,
    expert_counts,
    moe_entropy_reg,
    moe_modules,
    renorm_selectors,
    sigma_moe_dense,
    switch_head_dense,
    update_expert_bias,
)
from tests.conftest import reference_cases

ATOL = 1e-5


def n_trainable(module: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(module.trainable_parameters()))


def values_and_grads(module: nn.Module, fn, *inputs: mx.array):
    """Output of ``fn(*inputs)`` and gradients of a fixed random projection of it w.r.t. the
    module's trainable parameters and every input."""
    out = fn(*inputs)
    cot = mx.random.normal(out.shape, key=mx.random.key(123))
    params = module.trainable_parameters()

    def loss(params, *inputs):
        module.update(params)
        return (fn(*inputs) * cot).sum()

    grads = mx.grad(loss, argnums=tuple(range(len(inputs) + 1)))(params, *inputs)
    module.update(params)  # drop the tracers that the traced update left behind
    return out, dict(tree_flatten(grads[0])), grads[1:]


def assert_close(a: mx.array, b: mx.array, atol: float = ATOL, what: str = "") -> None:
    a, b = np.array(a), np.array(b)
    assert a.shape == b.shape, what
    diff = np.abs(a - b).max() if a.size else 0.0
    assert diff <= atol + ATOL * np.abs(b).max(), f"{what}: max diff {diff}"


def assert_same_outputs_and_grads(module, fast, dense, *inputs) -> None:
    out_f, grads_f, in_grads_f = values_and_grads(module, fast, *inputs)
    out_d, grads_d, in_grads_d = values_and_grads(module, dense, *inputs)
    assert_close(out_f, out_d, what="output")
    assert set(grads_f) == set(grads_d)
    for name in grads_f:
        assert_close(grads_f[name], grads_d[name], what=f"grad {name}")
    for i, (gf, gd) in enumerate(zip(in_grads_f, in_grads_d, strict=True)):
        assert_close(gf, gd, what=f"grad input {i}")


# --------------------------------------------------------------------------------------------
# Gather path == dense oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skewed", [False, True])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("E", [2, 8, 192])
def test_sigma_moe_matches_dense(E, k, skewed):
    if skewed and k >= E:
        pytest.skip("every expert is used when k == E")
    mx.random.seed(E * 10 + k)
    D, es = (16, 8) if E == 192 else (32, 24)
    moe = SigmaMoE(D, E, es, k, init_scale=1.0)
    moe.route_scale = mx.array([1.3])
    if skewed:
        # Only the first k experts can win: the rest are pushed far down by the (selection) bias.
        moe.expert_bias = mx.where(mx.arange(E) < k, 0.0, -50.0)
    x = mx.random.normal((2, 24, D))
    sel = rms_norm(x + mx.random.normal(x.shape))
    used = np.unique(np.array(moe.route(sel)[1]))
    if skewed or E == 192:
        assert len(used) < E, "the test needs experts that receive no tokens"
    assert_same_outputs_and_grads(moe, moe, partial(sigma_moe_dense, moe), x, sel)


@pytest.mark.parametrize("skewed", [False, True])
@pytest.mark.parametrize("H", [1, 2])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("E", [2, 8])
def test_switch_head_matches_dense(E, k, H, skewed):
    if skewed and k >= E:
        pytest.skip("every expert is used when k == E")
    mx.random.seed(E * 100 + k * 10 + H)
    D = 32
    sh = SwitchHead(D, H, E, k, init_scale=1.0)
    sh.route_scale = mx.array([0.8])
    if skewed:
        favoured = mx.tile(mx.arange(E) < k, (H,))
        sh.expert_v_bias = mx.where(favoured, 0.0, -50.0)
        sh.expert_o_bias = mx.where(favoured, 0.0, -50.0)
    h = mx.random.normal((2, 12, D)) * 2
    a = rms_norm(h)
    if skewed:
        (_, idx_v, _), (_, idx_o, _) = sh.route(a)
        assert int(np.array(idx_v).max()) < k and int(np.array(idx_o).max()) < k
    assert_same_outputs_and_grads(sh, sh, partial(switch_head_dense, sh), a, h)


def np_route(logits: np.ndarray, bias: np.ndarray, k: int, route_scale: float):
    """Reference routing in numpy: top-k on sigmoid(l + b), weights from the unbiased sigmoid."""
    sig = lambda z: 1 / (1 + np.exp(-z))
    idx = np.argsort(-sig(logits + bias), axis=-1, kind="stable")[..., :k]
    w = np.take_along_axis(sig(logits), idx, -1)
    return np.sort(idx, -1), w / np.maximum(w.sum(-1, keepdims=True), 1e-9) * route_scale


def test_routing_matches_numpy():
    mx.random.seed(11)
    moe = SigmaMoE(16, 8, 4, 3, init_scale=1.0)
    moe.expert_bias = mx.random.normal((8,))
    moe.route_scale = mx.array([1.7])
    sel = rms_norm(mx.random.normal((2, 5, 16)))
    logits, idx, w = moe.route(sel)
    np.testing.assert_allclose(np.array(logits), np.array(sel) @ np.array(moe.expert_sel).T,
                               rtol=1e-5, atol=1e-6)
    ref_idx, ref_w = np_route(np.array(logits), np.array(moe.expert_bias), 3, 1.7)
    order = np.argsort(np.array(idx), -1)
    np.testing.assert_array_equal(np.take_along_axis(np.array(idx), order, -1), ref_idx)
    np.testing.assert_allclose(np.sort(np.array(w), -1), np.sort(ref_w, -1), rtol=1e-5)

    sh = SwitchHead(16, 2, 4, 2, init_scale=1.0)
    sh.expert_o_bias = mx.random.normal((8,))
    sh.route_scale = mx.array([0.6])
    a = rms_norm(mx.random.normal((2, 5, 16)))
    _, (lo, idx_o, w_o) = sh.route(a)
    np.testing.assert_allclose(np.array(lo).reshape(2, 5, 8), np.array(a) @ np.array(sh.sel_o).T,
                               rtol=1e-5, atol=1e-6)
    ref_idx, ref_w = np_route(np.array(lo), np.array(sh.expert_o_bias).reshape(2, 4), 2, 0.6)
    np.testing.assert_array_equal(np.sort(np.array(idx_o), -1), ref_idx)
    np.testing.assert_allclose(np.sort(np.array(w_o), -1), np.sort(ref_w, -1), rtol=1e-5)


def test_switch_head_rope_dims():
    assert SwitchHead(64, 1, 2, 1, init_scale=1.0).n_rot == 32
    assert SwitchHead(64, 2, 2, 1, init_scale=1.0).n_rot == 16
    assert SwitchHead(12, 2, 2, 1, init_scale=1.0).n_rot == 2  # int(0.5 * 6) = 3 -> even 2


# --------------------------------------------------------------------------------------------
# Parameters, buffers, init
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, expected", [
    (lambda: SwitchHead(64, 1, 2, 1, init_scale=0.378), 24_833),
    (lambda: SigmaMoE(64, 8, 192, 2, init_scale=0.378), 197_121),
    (lambda: SwitchHead(64, 1, 32, 1, init_scale=0.5), 274_433),
    (lambda: SigmaMoE(64, 192, 192, 2, init_scale=0.5), 4_730_881),
])
def test_parameter_counts(build, expected):
    assert n_trainable(build()) == expected


def test_names_and_shapes_match_reference_state_dict():
    sigma = dict(tree_flatten(SigmaMoE(64, 8, 192, 2, init_scale=0.378).parameters()))
    switch = dict(tree_flatten(SwitchHead(64, 1, 2, 1, init_scale=0.378).parameters()))
    expected_sigma = {"keys": (8, 64, 192), "values": (8, 192, 64), "expert_sel": (8, 64),
                      "route_scale": (1,), "expert_bias": (8,), "expert_token_count": (8,),
                      "expert_running_load": (8,), "selector_target_std": ()}
    expected_switch = {"v": (2, 64, 64), "o": (2, 64, 64), "sel_v": (2, 64), "sel_o": (2, 64),
                       "route_scale": (1,), "sel_v_target_std": (), "sel_o_target_std": (),
                       "q.weight": (64, 64), "k.weight": (64, 64)}
    for r in ("v", "o"):
        for name in ("bias", "token_count", "running_load"):
            expected_switch[f"expert_{r}_{name}"] = (2,)
    assert {k: tuple(v.shape) for k, v in sigma.items()} == expected_sigma
    assert {k: tuple(v.shape) for k, v in switch.items()} == expected_switch


@pytest.mark.parametrize("folder", reference_cases(["trm_tinystories_1m_moeut"]))
def test_reference_fixture_keys_match(folder):
    torch = pytest.importorskip("torch")
    checkpoint = torch.load(folder / "step_0.pt", weights_only=True)
    state, arch = checkpoint["model_state_dict"], checkpoint["config"]["arch"]
    prefix = "model.inner.L_level.layers.0."
    ref = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    d = arch["hidden_size"]
    ours = {f"mlp.{k}": tuple(v.shape) for k, v in
            tree_flatten(SigmaMoE(d, 8, arch["moe_ff_expert_size"], 2, init_scale=0.378)
                         .parameters())}
    ours.update({f"self_attn.{k}": tuple(v.shape) for k, v in
                 tree_flatten(SwitchHead(d, 1, 2, 1, init_scale=0.378).parameters())})
    assert ours == ref
    # The reference's stored target std is the (unbiased) std of its renormalised selector.
    sel = state[prefix + "mlp.expert_sel"].double()
    assert float(state[prefix + "mlp.selector_target_std"]) == pytest.approx(
        float(sel.std()), rel=1e-5)


def test_buffers_are_frozen_and_saved(tmp_path):
    moe = SigmaMoE(16, 4, 8, 2, init_scale=0.5)
    trainable = dict(tree_flatten(moe.trainable_parameters()))
    assert set(trainable) == {"keys", "values", "expert_sel", "route_scale"}
    moe.expert_bias = mx.array([0.1, -0.2, 0.3, 0.0])
    moe.save_weights(str(tmp_path / "w.safetensors"))
    other = SigmaMoE(16, 4, 8, 2, init_scale=0.5)
    other.load_weights(str(tmp_path / "w.safetensors"))
    assert np.allclose(np.array(other.expert_bias), [0.1, -0.2, 0.3, 0.0])
    assert np.allclose(np.array(other["keys"]), np.array(moe["keys"]))
    sh = SwitchHead(16, 2, 4, 1, init_scale=0.5)
    assert set(dict(tree_flatten(sh.trainable_parameters()))) == {
        "q.weight", "k.weight", "v", "o", "sel_v", "sel_o", "route_scale"}
    no_balancing = SigmaMoE(16, 4, 8, 2, init_scale=0.5, bias_balancing=False)
    assert "expert_bias" not in dict(tree_flatten(no_balancing.parameters()))


def _check_selector(sel: mx.array, target: mx.array, expected_std: float) -> None:
    sel, target = np.array(sel, dtype=np.float64), float(target)
    norms = np.linalg.norm(sel, axis=1)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-5)  # rows renormalised
    assert sel.std(ddof=1) == pytest.approx(target, rel=1e-5)
    assert target == pytest.approx(expected_std, rel=0.05)


def test_sigma_moe_init_statistics():
    mx.random.seed(0)
    scale, D, E, es = 0.5, 64, 192, 192
    moe = SigmaMoE(D, E, es, 2, init_scale=scale)
    assert float(np.array(moe["keys"]).std()) == pytest.approx(scale / math.sqrt(D), rel=0.01)
    assert float(np.array(moe["values"]).std()) == pytest.approx(
        scale / math.sqrt(E * es), rel=0.01)
    assert abs(float(np.array(moe["keys"]).mean())) < 1e-3
    _check_selector(moe.expert_sel, moe.selector_target_std, scale / math.sqrt(D))
    assert np.array(moe.route_scale).tolist() == [1.0]
    for name in ("expert_bias", "expert_token_count", "expert_running_load"):
        assert not np.array(getattr(moe, name)).any()


def test_switch_head_init_statistics():
    mx.random.seed(0)
    scale, D, H, E = 0.5, 64, 2, 32
    sh = SwitchHead(D, H, E, 1, init_scale=scale)
    std = scale / math.sqrt(D)
    for w in (sh.q.weight, sh.k.weight, sh.v):
        assert float(np.array(w).std()) == pytest.approx(std, rel=0.03)
    o_std = scale / math.sqrt(H * sh.head_dim)
    assert float(np.array(sh.o).std()) == pytest.approx(o_std, rel=0.03)
    _check_selector(sh.sel_v, sh.sel_v_target_std, std)
    _check_selector(sh.sel_o, sh.sel_o_target_std, std)
    assert sh.bias_update_rate == pytest.approx(1e-3 * math.sqrt(E))


# --------------------------------------------------------------------------------------------
# Causality and KV cache
# --------------------------------------------------------------------------------------------


def test_switch_head_is_causal():
    mx.random.seed(1)
    sh = SwitchHead(32, 2, 4, 2, init_scale=1.0)
    h = mx.random.normal((2, 16, 32))
    h2 = mx.concatenate([h[:, :9], mx.random.normal((2, 7, 32))], axis=1)
    out, out2 = sh(rms_norm(h), h), sh(rms_norm(h2), h2)
    assert_close(out[:, :9], out2[:, :9], atol=1e-6, what="positions before the change")
    assert np.abs(np.array(out[:, 9:] - out2[:, 9:])).max() > 1e-3


class ConcatCache:
    """mlx-lm's KVCache contract in its simplest form: keys/values concatenated on axis 2."""

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        return self.keys, self.values

    def make_mask(self, n: int, **kwargs):
        # New queries sit at the end of the returned keys: "causal" aligns them there.
        return "causal" if n > 1 else None


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 3, 2]])
def test_switch_head_kv_cache_matches_full_sequence(chunks):
    mx.random.seed(2)
    sh = SwitchHead(32, 2, 4, 2, init_scale=1.0)
    h = mx.random.normal((2, sum(chunks), 32))
    a = rms_norm(h)
    full = sh(a, h)
    cache, parts, start = ConcatCache(), [], 0
    for n in chunks:
        parts.append(sh(a[:, start:start + n], h[:, start:start + n], cache=cache))
        start += n
    assert cache.offset == h.shape[1]
    assert_close(mx.concatenate(parts, axis=1), full, what="cached vs full")


def test_switch_head_with_project_caches():
    """The project's KVCache and the left-padded fixed-capacity BatchKVCache (per-row offsets)."""
    cache_mod = pytest.importorskip("mlx_trm.models.cache")
    if not hasattr(cache_mod, "make_batch_cache") or not hasattr(cache_mod, "KVCache"):
        pytest.skip("models/cache.py has no KVCache / make_batch_cache")
    mx.random.seed(12)
    sh = SwitchHead(32, 2, 4, 2, init_scale=1.0)
    h = mx.random.normal((2, 12, 32))
    a = rms_norm(h)
    full = sh(a, h)

    cache = cache_mod.KVCache()
    parts = [sh(a[:, :7], h[:, :7], cache=cache)]
    parts += [sh(a[:, t:t + 1], h[:, t:t + 1], cache=cache) for t in range(7, 12)]
    assert_close(mx.concatenate(parts, axis=1), full, what="KVCache")

    # Row 1 holds only its last 9 tokens, left-padded by 3 columns (RoPE positions restart at 0).
    pad = 3
    h_b = mx.concatenate([h[:1], mx.concatenate([mx.zeros((1, pad, 32)), h[1:, :9]], 1)])
    a_b = rms_norm(h_b)
    positions, (slot,) = cache_mod.make_batch_cache(1, [0, pad], capacity=16)
    outs = [sh(a_b[:, :8], h_b[:, :8], cache=slot)]
    positions.advance(8)
    for t in range(8, 12):
        outs.append(sh(a_b[:, t:t + 1], h_b[:, t:t + 1], cache=slot))
        positions.advance(1)
    out = mx.concatenate(outs, axis=1)
    assert_close(out[0], full[0], what="batch cache, row 0")
    assert_close(out[1, pad:], sh(a[1:, :9], h[1:, :9])[0], what="batch cache, padded row 1")


# --------------------------------------------------------------------------------------------
# Record, counts, entropy regulariser
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, D=16, H=2, E_att=4, E_ff=8, **kw):
        super().__init__()
        self.self_attn = SwitchHead(D, H, E_att, 2, init_scale=1.0, **kw)
        self.mlp = SigmaMoE(D, E_ff, 12, 2, init_scale=1.0, **kw)

    def __call__(self, h, record=None):
        a = rms_norm(h)
        h = rms_norm(h + self.self_attn(a, h, record=record))
        return rms_norm(h + self.mlp(h, rms_norm(h), record=record))


class Toy(nn.Module):
    def __init__(self, n_layers=2, **kw):
        super().__init__()
        self.layers = [Block(**kw) for _ in range(n_layers)]

    def __call__(self, h, record=None, calls=2):
        for _ in range(calls):  # weight-shared recursion: every module is called `calls` times
            for layer in self.layers:
                h = layer(h, record)
        return h


def np_neg_marginal_entropy(logits: list[np.ndarray]) -> float:
    """Straightforward numpy: softmax, mean over tokens of every call, -H per (row, head), mean."""
    pooled = np.concatenate([np.asarray(x, dtype=np.float64) for x in logits], axis=1)
    p = np.exp(pooled - pooled.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    marginal = p.mean(axis=1)
    return float((marginal * np.log(marginal)).sum(-1).mean())


def test_record_and_entropy_reg_match_numpy():
    mx.random.seed(3)
    model = Toy()
    record = []
    model(mx.random.normal((3, 10, 16)), record=record)
    assert len(record) == 2 * 2 * 3  # calls x layers x (v, o, ff)
    kinds = {(id(m), r) for m, r, _, _ in record}
    assert len(kinds) == 6
    for _, router, logits, idx in record:
        if router == "ff":
            assert logits.shape == (3, 10, 8) and idx.shape == (3, 10, 2)
        else:
            assert logits.shape == (3, 10, 2, 4) and idx.shape == (3, 10, 2, 2)
            assert int(np.array(idx).max()) < 4  # per-head local ids
    expected = 0.0
    for _, module in moe_modules(model):
        routers = ["ff"] if isinstance(module, SigmaMoE) else ["v", "o"]
        for r in routers:
            logits = [np.array(lg) for m, rr, lg, _ in record if m is module and rr == r]
            assert len(logits) == 2
            expected += module.entropy_coef * np_neg_marginal_entropy(logits)
    assert float(moe_entropy_reg(record)) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert float(moe_entropy_reg([])) == 0.0


def test_entropy_reg_random_logits_and_gradient():
    mx.random.seed(4)
    moe = SigmaMoE(16, 6, 8, 2, init_scale=1.0, entropy_coef=0.01)
    sh = SwitchHead(18, 3, 5, 1, init_scale=1.0, entropy_coef=0.001)
    ff = [mx.random.normal((2, 7, 6)) * 3 for _ in range(3)]
    v = [mx.random.normal((2, 7, 3, 5)) * 2 for _ in range(2)]
    o = [mx.random.normal((2, 7, 3, 5)) for _ in range(2)]
    dummy = mx.zeros((1,), dtype=mx.uint32)
    record = ([(moe, "ff", x, dummy) for x in ff] + [(sh, "v", x, dummy) for x in v]
              + [(sh, "o", x, dummy) for x in o])
    expected = (0.01 * np_neg_marginal_entropy(ff) + 0.001 * (np_neg_marginal_entropy(v)
                                                                + np_neg_marginal_entropy(o)))
    assert float(moe_entropy_reg(record)) == pytest.approx(expected, rel=1e-5)
    # Uniform logits: the marginal is uniform and the reg is exactly -log(E).
    flat = [(moe, "ff", mx.zeros((2, 4, 6)), dummy)]
    assert float(moe_entropy_reg(flat)) == pytest.approx(-0.01 * math.log(6), rel=1e-6)

    # Gradient reaches the selectors through a real forward.
    model = Toy(n_layers=1)
    h = mx.random.normal((2, 8, 16))

    def reg(params):
        model.update(params)
        record = []
        model(h, record=record, calls=1)
        return moe_entropy_reg(record)

    params = model.trainable_parameters()
    grads = dict(tree_flatten(mx.grad(reg)(params)))
    model.update(params)
    for name in ("layers.0.mlp.expert_sel", "layers.0.self_attn.sel_v",
                 "layers.0.self_attn.sel_o"):
        g = np.array(grads[name])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name

    # Calls made "without gradient" still count in the value but pass no gradient.
    def reg_detached(params):
        model.update(params)
        record = []
        model(mx.stop_gradient(h), record=record, calls=1)
        detach_record(record)
        return moe_entropy_reg(record)

    value, grads = mx.value_and_grad(reg_detached)(params)
    model.update(params)
    assert float(value) == pytest.approx(float(reg(params)), rel=1e-6)
    model.update(params)
    assert all(not np.array(g).any() for _, g in tree_flatten(grads))


def test_expert_counts():
    mx.random.seed(5)
    model = Toy()
    record = []
    model(mx.random.normal((2, 9, 16)), record=record)
    counts = expert_counts(record, model)
    assert set(counts) == {f"layers.{i}.{n}" for i in (0, 1) for n in
                           ("mlp.expert_token_count", "self_attn.expert_v_token_count",
                            "self_attn.expert_o_token_count")}
    for path, module in moe_modules(model):
        if isinstance(module, SigmaMoE):
            idx = [np.array(i) for m, _, _, i in record if m is module]
            expected = np.bincount(np.concatenate([i.ravel() for i in idx]), minlength=8)
            got = counts[f"{path}.expert_token_count"]
            assert got.dtype == mx.float32 and got.shape == (8,)
            np.testing.assert_array_equal(np.array(got), expected)
            assert float(got.sum()) == 2 * 9 * 2 * 2  # tokens x slots x calls
        else:
            for r in ("v", "o"):
                idx = [np.array(i) for m, rr, _, i in record if m is module and rr == r]
                glob = [i + np.arange(2)[:, None] * 4 for i in idx]  # h * E + e
                expected = np.bincount(np.concatenate([g.ravel() for g in glob]), minlength=8)
                np.testing.assert_array_equal(
                    np.array(counts[f"{path}.expert_{r}_token_count"]), expected)
    with pytest.raises(ValueError):
        expert_counts(record, Toy())


# --------------------------------------------------------------------------------------------
# Bias balancing and selector renorm
# --------------------------------------------------------------------------------------------


def test_update_expert_bias_one_step_by_hand():
    moe = SigmaMoE(16, 4, 8, 2, init_scale=0.5, bias_update_rate=0.01, bias_momentum=0.9,
                   bias_clip=1.0)
    moe.expert_running_load = mx.array([0.1, 0.2, 0.3, 0.4])
    moe.expert_bias = mx.array([0.0, 0.05, -0.05, 0.1])
    moe.expert_token_count = mx.array([1.0, 0.0, 0.0, 0.0])  # already accumulated
    counts = {"expert_token_count": mx.array([5.0, 2.0, 0.0, 0.0])}
    update_expert_bias(moe, counts)
    c = np.array([6.0, 2.0, 0.0, 0.0])
    R = 0.9 * np.array([0.1, 0.2, 0.3, 0.4]) + 0.1 * c / c.sum()
    s = float(moe.selector_target_std) * math.sqrt(16 * 4)
    b = np.array([0.0, 0.05, -0.05, 0.1]) - 0.01 * s * (R - 0.25) / 0.25
    b = np.clip(b, -s, s)
    np.testing.assert_allclose(np.array(moe.expert_running_load), R, rtol=1e-6)
    np.testing.assert_allclose(np.array(moe.expert_bias), b, rtol=1e-5, atol=1e-7)
    assert not np.array(moe.expert_token_count).any()

    # SwitchHead: per-head E in the scale, H*E in the target, rate pre-multiplied by sqrt(E).
    sh = SwitchHead(16, 2, 3, 1, init_scale=0.5, bias_update_rate=0.01, bias_clip=None)
    cv = np.array([4.0, 0, 2, 1, 1, 0])
    update_expert_bias(sh, {"expert_v_token_count": mx.array(cv)})
    Rv = 0.1 * cv / cv.sum()
    sv = float(sh.sel_v_target_std) * math.sqrt(16 * 3)
    np.testing.assert_allclose(np.array(sh.expert_v_bias),
                               -0.01 * math.sqrt(3) * sv * (Rv - 1 / 6) * 6, rtol=1e-5)
    # The o router saw no tokens: untouched, as in the reference.
    assert not np.array(sh.expert_o_bias).any() and not np.array(sh.expert_o_running_load).any()

    # Clipping at +-clip * s.
    moe.bias_update_rate = 10.0
    update_expert_bias(moe, {"expert_token_count": mx.array([8.0, 0.0, 0.0, 0.0])})
    assert np.abs(np.array(moe.expert_bias)).max() == pytest.approx(s, rel=1e-6)


def test_bias_balancing_evens_out_a_skewed_router():
    mx.random.seed(6)
    D, E, k = 16, 8, 2
    moe = SigmaMoE(D, E, 8, k, init_scale=1.0, bias_update_rate=0.05, bias_momentum=0.9)
    # Tokens share a strong common direction u, and expert 0's selector points along u.
    u = mx.random.normal((D,))
    u = u / mx.linalg.norm(u)
    row_norm = mx.linalg.norm(moe.expert_sel[1])
    moe.expert_sel = mx.concatenate([(u * row_norm)[None], moe.expert_sel[1:]])

    def loads():
        x = mx.random.normal((4, 64, D)) + 3 * u
        record = []
        moe(x, rms_norm(x), record=record)
        counts = expert_counts(record, moe)
        c = np.array(counts["expert_token_count"])
        return c / c.sum(), counts

    s = float(moe.selector_target_std) * math.sqrt(D * E)
    first, _ = loads()
    assert first[0] > 0.45  # expert 0 takes (almost) every token's first slot
    history = []
    for _ in range(150):
        load, counts = loads()
        history.append(load.max())
        update_expert_bias(moe, counts)
        renorm_selectors(moe)
        assert np.abs(np.array(moe.expert_bias)).max() <= s * (1 + 1e-6)
        assert not np.array(moe.expert_token_count).any()
    assert np.mean(history[-20:]) < 0.6 * first.max()
    assert np.array(moe.expert_bias)[0] < -0.1 * s  # the favoured expert was pushed down


def test_accumulated_counts_are_used_and_reset():
    moe = SigmaMoE(16, 4, 8, 2, init_scale=0.5)
    accumulate_expert_counts(moe, {"expert_token_count": mx.array([3.0, 1.0, 0.0, 0.0])})
    accumulate_expert_counts(moe, {"expert_token_count": mx.array([1.0, 1.0, 1.0, 1.0])})
    np.testing.assert_array_equal(np.array(moe.expert_token_count), [4, 2, 1, 1])
    update_expert_bias(moe)
    np.testing.assert_allclose(np.array(moe.expert_running_load), 0.1 * np.array([4, 2, 1, 1]) / 8)
    assert not np.array(moe.expert_token_count).any()


def test_renorm_selectors():
    mx.random.seed(7)
    model = Toy(n_layers=1)
    block = model.layers[0]
    block.mlp.expert_sel = block.mlp.expert_sel * mx.random.uniform(0.5, 3.0, (8, 1)) + 0.01
    block.self_attn.sel_v = block.self_attn.sel_v * 4
    block.self_attn.sel_o = block.self_attn.sel_o + 0.1
    renorm_selectors(model)
    for sel, target in ((block.mlp.expert_sel, block.mlp.selector_target_std),
                        (block.self_attn.sel_v, block.self_attn.sel_v_target_std),
                        (block.self_attn.sel_o, block.self_attn.sel_o_target_std)):
        _check_selector(sel, target, float(target))
    # Without bias balancing selectors are left alone (the reference trainer skips them).
    free = SigmaMoE(16, 4, 8, 2, init_scale=0.5, bias_balancing=False)
    free.expert_sel = free.expert_sel * 3
    before = np.array(free.expert_sel)
    renorm_selectors(free)
    np.testing.assert_array_equal(np.array(free.expert_sel), before)


# --------------------------------------------------------------------------------------------
# mx.compile
# --------------------------------------------------------------------------------------------


def test_compiled_forward_backward_matches():
    mx.random.seed(8)
    model = Toy(n_layers=1)
    h = mx.random.normal((2, 8, 16))

    def loss_fn(h):
        record = []
        out = model(h, record=record)
        return (out ** 2).mean() + moe_entropy_reg(record)

    value_and_grad = nn.value_and_grad(model, loss_fn)
    ref_loss, ref_grads = value_and_grad(h)
    state = [model.state]
    compiled = mx.compile(value_and_grad, inputs=state, outputs=state)
    for _ in range(2):
        loss, grads = compiled(h)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
        flat_ref = dict(tree_flatten(ref_grads))
        for name, g in tree_flatten(grads):
            assert_close(g, flat_ref[name], what=name)


def test_compiled_training_mechanics_match():
    """grads + counts + bias update + selector renorm in one compiled step == uncompiled."""

    def make():
        mx.random.seed(9)
        return Toy(n_layers=1)

    def make_step(model):
        def loss_fn(h):
            record = []
            out = model(h, record=record)
            return (out ** 2).mean() + moe_entropy_reg(record), expert_counts(record, model)

        def step(h):
            (loss, counts), grads = nn.value_and_grad(model, loss_fn)(h)
            update_expert_bias(model, counts)
            model.update(tree_map(lambda p, g: p - 0.1 * g, model.trainable_parameters(), grads))
            renorm_selectors(model)
            return loss, counts

        return step

    eager, compiled_model = make(), make()
    state = [compiled_model.state]
    compiled = mx.compile(make_step(compiled_model), inputs=state, outputs=state)
    eager_step = make_step(eager)
    for i in range(3):
        h = mx.random.normal((2, 8, 16), key=mx.random.key(i))
        l1, c1 = eager_step(h)
        l2, c2 = compiled(h)
        assert float(l1) == pytest.approx(float(l2), rel=1e-5)
        for key in c1:
            np.testing.assert_array_equal(np.array(c1[key]), np.array(c2[key]))
    flat_e = dict(tree_flatten(eager.parameters()))
    for name, value in tree_flatten(compiled_model.parameters()):
        assert_close(value, flat_e[name], what=name)
    assert np.abs(np.array(flat_e["layers.0.mlp.expert_bias"])).max() > 0

