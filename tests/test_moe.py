"""sigma-MoE and SwitchHead: gather path vs dense oracle (values and gradients), parameter counts,
init, reference names, causality, KV cache, bias balancing, selector renorm, entropy reg, counts,
mx.compile."""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_trm.models.layers import rms_norm
from mlx_trm.models.moe import SigmaMoE, SwitchHead, from_reference_names, to_reference_names
from mlx_trm.models.router import RoutingLog, routers
from tests.conftest import reference_cases
from tests.moe_reference import sigma_moe_dense, switch_head_dense

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


# skewed routing needs k < E (with k == E every expert is used)
@pytest.mark.parametrize("E,k,skewed", [(E, k, skewed) for E in (2, 8, 192) for k in (1, 2)
                                        for skewed in (False, True) if not (skewed and k >= E)])
def test_sigma_moe_matches_dense(E, k, skewed):
    mx.random.seed(E * 10 + k)
    D, es = (16, 8) if E == 192 else (32, 24)
    moe = SigmaMoE(D, E, es, k, init_scale=1.0)
    moe.route_scale = mx.array([1.3])
    if skewed:
        # Only the first k experts can win: the rest are pushed far down by the (selection) bias.
        moe.router.bias = mx.where(mx.arange(E) < k, 0.0, -50.0)
    x = mx.random.normal((2, 24, D))
    sel = rms_norm(x + mx.random.normal(x.shape))
    used = np.unique(np.array(moe.route(sel)[1]))
    if skewed or E == 192:
        assert len(used) < E, "the test needs experts that receive no tokens"
    assert_same_outputs_and_grads(moe, moe, partial(sigma_moe_dense, moe), x, sel)


@pytest.mark.parametrize("E,k,H,skewed", [(E, k, H, skewed) for E in (2, 8) for k in (1, 2)
                                          for H in (1, 2) for skewed in (False, True)
                                          if not (skewed and k >= E)])
def test_switch_head_matches_dense(E, k, H, skewed):
    mx.random.seed(E * 100 + k * 10 + H)
    D = 32
    sh = SwitchHead(D, H, E, k, init_scale=1.0)
    sh.route_scale = mx.array([0.8])
    if skewed:
        favoured = mx.tile(mx.arange(E) < k, (H,))
        sh.v_router.bias = mx.where(favoured, 0.0, -50.0)
        sh.o_router.bias = mx.where(favoured, 0.0, -50.0)
    h = mx.random.normal((2, 12, D)) * 2
    a = rms_norm(h)
    if skewed:
        (_, idx_v, _), (_, idx_o, _) = sh.route(a)
        assert int(np.array(idx_v).max()) < k and int(np.array(idx_o).max()) < k
    assert_same_outputs_and_grads(sh, sh, partial(switch_head_dense, sh), a, h)


@pytest.mark.parametrize("tokens", [1, 3])
def test_few_assignments_skip_the_sort_and_match_dense(tokens, monkeypatch):
    """A decode step's few assignments go to gather_mm unsorted (no argsort): the same values
    and gradients as the dense oracle, and as the sorted path forced on the same inputs."""
    from mlx_trm.models import switch_layers
    mx.random.seed(31 + tokens)
    moe = SigmaMoE(32, 8, 24, 2, init_scale=1.0)
    sh = SwitchHead(32, 2, 4, 2, init_scale=1.0)
    h = mx.random.normal((2, tokens, 32))
    a = rms_norm(h)
    assert 2 * tokens * 2 * 2 < switch_layers.SORT_THRESHOLD  # the most assignments here
    sorts = []
    real_sort = switch_layers.gather_sort
    monkeypatch.setattr(switch_layers, "gather_sort", lambda *a: sorts.append(1) or real_sort(*a))
    assert_same_outputs_and_grads(moe, moe, partial(sigma_moe_dense, moe), h, a)
    assert_same_outputs_and_grads(sh, sh, partial(switch_head_dense, sh), a, h)
    assert not sorts, "few assignments were sorted"
    unsorted = moe(h, a), sh(a, h)
    monkeypatch.setattr(switch_layers, "SORT_THRESHOLD", 1)
    for fast, sort in zip(unsorted, (moe(h, a), sh(a, h))):
        assert_close(fast, sort, atol=1e-6, what="unsorted vs sorted")
    assert sorts


def np_route(logits: np.ndarray, bias: np.ndarray, k: int, route_scale: float):
    """Reference routing in numpy: top-k on sigmoid(l + b), weights from the unbiased sigmoid."""
    sig = lambda z: 1 / (1 + np.exp(-z))
    idx = np.argsort(-sig(logits + bias), axis=-1, kind="stable")[..., :k]
    w = np.take_along_axis(sig(logits), idx, -1)
    return np.sort(idx, -1), w / np.maximum(w.sum(-1, keepdims=True), 1e-9) * route_scale


def test_routing_matches_numpy():
    mx.random.seed(11)
    moe = SigmaMoE(16, 8, 4, 3, init_scale=1.0)
    moe.router.bias = mx.random.normal((8,))
    moe.route_scale = mx.array([1.7])
    sel = rms_norm(mx.random.normal((2, 5, 16)))
    logits, idx, w = moe.route(sel)
    np.testing.assert_allclose(np.array(logits), np.array(sel) @ np.array(moe.router.weight).T,
                               rtol=1e-5, atol=1e-6)
    ref_idx, ref_w = np_route(np.array(logits), np.array(moe.router.bias), 3, 1.7)
    order = np.argsort(np.array(idx), -1)
    np.testing.assert_array_equal(np.take_along_axis(np.array(idx), order, -1), ref_idx)
    np.testing.assert_allclose(np.sort(np.array(w), -1), np.sort(ref_w, -1), rtol=1e-5)

    sh = SwitchHead(16, 2, 4, 2, init_scale=1.0)
    sh.o_router.bias = mx.random.normal((8,))
    sh.route_scale = mx.array([0.6])
    a = rms_norm(mx.random.normal((2, 5, 16)))
    _, (lo, idx_o, w_o) = sh.route(a)
    np.testing.assert_allclose(np.array(lo).reshape(2, 5, 8),
                               np.array(a) @ np.array(sh.o_router.weight).T, rtol=1e-5, atol=1e-6)
    ref_idx, ref_w = np_route(np.array(lo), np.array(sh.o_router.bias).reshape(2, 4), 2, 0.6)
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


def reference_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in
            to_reference_names(dict(tree_flatten(module.parameters()))).items()}


def test_names_and_shapes_match_reference_state_dict():
    sigma_module = SigmaMoE(64, 8, 192, 2, init_scale=0.378)
    sigma, switch = reference_shapes(sigma_module), reference_shapes(
        SwitchHead(64, 1, 2, 1, init_scale=0.378))
    expected_sigma = {"keys": (8, 64, 192), "values": (8, 192, 64), "expert_sel": (8, 64),
                      "route_scale": (1,), "expert_bias": (8,), "expert_token_count": (8,),
                      "expert_running_load": (8,), "selector_target_std": ()}
    expected_switch = {"v": (2, 64, 64), "o": (2, 64, 64), "sel_v": (2, 64), "sel_o": (2, 64),
                       "route_scale": (1,), "sel_v_target_std": (), "sel_o_target_std": (),
                       "q.weight": (64, 64), "k.weight": (64, 64)}
    for r in ("v", "o"):
        for name in ("bias", "token_count", "running_load"):
            expected_switch[f"expert_{r}_{name}"] = (2,)
    assert sigma == expected_sigma
    assert switch == expected_switch
    # Ours: experts as SwitchLinear [E, out, in] (mlx-lm's layout), buffers on the router.
    ours = {k: tuple(v.shape) for k, v in tree_flatten(sigma_module.parameters())}
    assert ours["keys.weight"] == (8, 192, 64) and ours["router.bias"] == (8,)
    # Reference names -> ours -> reference names is the identity, values included.
    flat = dict(tree_flatten(sigma_module.parameters()))
    back = from_reference_names(to_reference_names(flat))
    assert set(back) == set(flat)
    for k, v in flat.items():
        np.testing.assert_array_equal(np.array(back[k]), np.array(v))
    assert from_reference_names(flat).keys() == flat.keys()  # our names pass through


@pytest.mark.parametrize("folder", reference_cases(["trm_tinystories_1m_moeut"]))
def test_reference_fixture_keys_match(folder):
    torch = pytest.importorskip("torch")
    checkpoint = torch.load(folder / "step_0.pt", weights_only=True)
    state, arch = checkpoint["model_state_dict"], checkpoint["config"]["arch"]
    prefix = "model.inner.L_level.layers.0."
    ref = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    d = arch["hidden_size"]
    ours = {f"mlp.{k}": v for k, v in
            reference_shapes(SigmaMoE(d, 8, arch["moe_ff_expert_size"], 2,
                                      init_scale=0.378)).items()}
    ours.update({f"self_attn.{k}": v for k, v in
                 reference_shapes(SwitchHead(d, 1, 2, 1, init_scale=0.378)).items()})
    assert ours == ref
    # The reference's stored target std is the (unbiased) std of its renormalised selector.
    sel = state[prefix + "mlp.expert_sel"].double()
    assert float(state[prefix + "mlp.selector_target_std"]) == pytest.approx(
        float(sel.std()), rel=1e-5)


def test_buffers_are_frozen_and_saved(tmp_path):
    moe = SigmaMoE(16, 4, 8, 2, init_scale=0.5)
    trainable = dict(tree_flatten(moe.trainable_parameters()))
    assert set(trainable) == {"keys.weight", "values.weight", "router.weight", "route_scale"}
    moe.router.bias = mx.array([0.1, -0.2, 0.3, 0.0])
    moe.save_weights(str(tmp_path / "w.safetensors"))
    other = SigmaMoE(16, 4, 8, 2, init_scale=0.5)
    other.load_weights(str(tmp_path / "w.safetensors"))
    assert np.allclose(np.array(other.router.bias), [0.1, -0.2, 0.3, 0.0])
    assert np.allclose(np.array(other["keys"].weight), np.array(moe["keys"].weight))
    sh = SwitchHead(16, 2, 4, 1, init_scale=0.5)
    assert set(dict(tree_flatten(sh.trainable_parameters()))) == {
        "q.weight", "k.weight", "v.weight", "o.weight", "v_router.weight", "o_router.weight",
        "route_scale"}
    no_balancing = SigmaMoE(16, 4, 8, 2, init_scale=0.5, bias_balancing=False)
    assert "router.bias" not in dict(tree_flatten(no_balancing.parameters()))


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
    keys, values = np.array(moe["keys"].weight), np.array(moe["values"].weight)
    assert float(keys.std()) == pytest.approx(scale / math.sqrt(D), rel=0.01)
    assert float(values.std()) == pytest.approx(scale / math.sqrt(E * es), rel=0.01)
    assert abs(float(keys.mean())) < 1e-3
    _check_selector(moe.router.weight, moe.router.target_std, scale / math.sqrt(D))
    assert np.array(moe.route_scale).tolist() == [1.0]
    for name in ("bias", "token_count", "running_load"):
        assert not np.array(getattr(moe.router, name)).any()


def test_switch_head_init_statistics():
    mx.random.seed(0)
    scale, D, H, E = 0.5, 64, 2, 32
    sh = SwitchHead(D, H, E, 1, init_scale=scale)
    std = scale / math.sqrt(D)
    for w in (sh.q.weight, sh.k.weight, sh.v.weight):
        assert float(np.array(w).std()) == pytest.approx(std, rel=0.03)
    o_std = scale / math.sqrt(H * sh.head_dim)
    assert float(np.array(sh.o.weight).std()) == pytest.approx(o_std, rel=0.03)
    _check_selector(sh.v_router.weight, sh.v_router.target_std, std)
    _check_selector(sh.o_router.weight, sh.o_router.target_std, std)
    assert sh.v_router.bias_update_rate == pytest.approx(1e-3 * math.sqrt(E))


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
    """mlx-lm's KVCache (what model.make_cache() returns) and the left-padded fixed-capacity
    BatchKVCache of the compiled decoder (per-row offsets)."""
    from mlx_lm.models.cache import KVCache

    from mlx_trm.generation import cache as cache_mod
    mx.random.seed(12)
    sh = SwitchHead(32, 2, 4, 2, init_scale=1.0)
    h = mx.random.normal((2, 12, 32))
    a = rms_norm(h)
    full = sh(a, h)

    cache = KVCache()
    parts = [sh(a[:, :7], h[:, :7], cache=cache)]
    parts += [sh(a[:, t:t + 1], h[:, t:t + 1], cache=cache) for t in range(7, 12)]
    assert_close(mx.concatenate(parts, axis=1), full, what="KVCache")

    # Row 1 holds only its last 9 tokens, left-padded by 3 columns (RoPE positions restart at 0).
    pad = 3
    h_b = mx.concatenate([h[:1], mx.concatenate([mx.zeros((1, pad, 32)), h[1:, :9]], 1)])
    a_b = rms_norm(h_b)
    positions, (slot,) = cache_mod.make_cache(1, [0, pad], capacity=16)
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
    record = RoutingLog()
    model(mx.random.normal((3, 10, 16)), record=record)
    rs = routers(model)
    assert len(rs) == 2 * 3  # layers x (v, o, ff)
    expected = 0.0
    for router in rs:
        logits, idx = record.calls(router)
        assert len(logits) == len(idx) == 2  # calls
        for lg, i in zip(logits, idx):
            if not router.grouped:
                assert lg.shape == (3, 10, 8) and i.shape == (3, 10, 2)
            else:
                assert lg.shape == (3, 10, 2, 4) and i.shape == (3, 10, 2, 2)
                assert int(np.array(i).max()) < 4  # per-head local ids
        expected += router.entropy_coef * np_neg_marginal_entropy([np.array(x) for x in logits])
    assert float(record.entropy_reg()) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert float(RoutingLog().entropy_reg()) == 0.0


def test_entropy_reg_random_logits_and_gradient():
    mx.random.seed(4)
    moe = SigmaMoE(16, 6, 8, 2, init_scale=1.0, entropy_coef=0.01)
    sh = SwitchHead(18, 3, 5, 1, init_scale=1.0, entropy_coef=0.001)
    ff = [mx.random.normal((2, 7, 6)) * 3 for _ in range(3)]
    v = [mx.random.normal((2, 7, 3, 5)) * 2 for _ in range(2)]
    o = [mx.random.normal((2, 7, 3, 5)) for _ in range(2)]
    dummy = mx.zeros((1,), dtype=mx.uint32)
    record = RoutingLog()
    for router, calls in ((moe.router, ff), (sh.v_router, v), (sh.o_router, o)):
        for x in calls:
            record.add(router, x, dummy)
    expected = (0.01 * np_neg_marginal_entropy(ff) + 0.001 * (np_neg_marginal_entropy(v)
                                                                + np_neg_marginal_entropy(o)))
    assert float(record.entropy_reg()) == pytest.approx(expected, rel=1e-5)
    # Uniform logits: the marginal is uniform and the reg is exactly -log(E).
    flat = RoutingLog()
    flat.add(moe.router, mx.zeros((2, 4, 6)), dummy)
    assert float(flat.entropy_reg()) == pytest.approx(-0.01 * math.log(6), rel=1e-6)

    # Gradient reaches the selectors through a real forward.
    model = Toy(n_layers=1)
    h = mx.random.normal((2, 8, 16))

    def reg(params):
        model.update(params)
        record = RoutingLog()
        model(h, record=record, calls=1)
        return record.entropy_reg()

    params = model.trainable_parameters()
    grads = dict(tree_flatten(mx.grad(reg)(params)))
    model.update(params)
    for name in ("layers.0.mlp.router.weight", "layers.0.self_attn.v_router.weight",
                 "layers.0.self_attn.o_router.weight"):
        g = np.array(grads[name])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name

    # Calls made "without gradient" still count in the value but pass no gradient.
    def reg_detached(params):
        model.update(params)
        record = RoutingLog()
        model(mx.stop_gradient(h), record=record.detached(), calls=1)
        return record.entropy_reg()

    value, grads = mx.value_and_grad(reg_detached)(params)
    model.update(params)
    assert float(value) == pytest.approx(float(reg(params)), rel=1e-6)
    model.update(params)
    assert all(not np.array(g).any() for _, g in tree_flatten(grads))


def test_expert_counts():
    mx.random.seed(5)
    model = Toy()
    record = RoutingLog()
    model(mx.random.normal((2, 9, 16)), record=record)
    rs = routers(model)
    counts = record.counts(rs)
    assert len(counts) == len(rs) == 6
    for router, got in zip(rs, counts):
        idx = [np.array(i) for i in record.calls(router)[1]]
        if not router.grouped:
            assert got.dtype == mx.float32 and got.shape == (8,)
            expected = np.bincount(np.concatenate([i.ravel() for i in idx]), minlength=8)
            assert float(got.sum()) == 2 * 9 * 2 * 2  # tokens x slots x calls
        else:
            glob = [i + np.arange(2)[:, None] * 4 for i in idx]  # h * E + e
            expected = np.bincount(np.concatenate([g.ravel() for g in glob]), minlength=8)
        np.testing.assert_array_equal(np.array(got), expected)
    # A router that was not called counts nothing.
    assert all(not np.array(c).any() for c in RoutingLog().counts(rs))


# --------------------------------------------------------------------------------------------
# Bias balancing and selector renorm
# --------------------------------------------------------------------------------------------


def test_update_expert_bias_one_step_by_hand():
    moe = SigmaMoE(16, 4, 8, 2, init_scale=0.5, bias_update_rate=0.01, bias_momentum=0.9,
                   bias_clip=1.0)
    router = moe.router
    router.running_load = mx.array([0.1, 0.2, 0.3, 0.4])
    router.bias = mx.array([0.0, 0.05, -0.05, 0.1])
    router.token_count = mx.array([1.0, 0.0, 0.0, 0.0])  # already accumulated
    router.update_bias(mx.array([5.0, 2.0, 0.0, 0.0]))
    c = np.array([6.0, 2.0, 0.0, 0.0])
    R = 0.9 * np.array([0.1, 0.2, 0.3, 0.4]) + 0.1 * c / c.sum()
    s = float(router.target_std) * math.sqrt(16 * 4)
    b = np.array([0.0, 0.05, -0.05, 0.1]) - 0.01 * s * (R - 0.25) / 0.25
    b = np.clip(b, -s, s)
    np.testing.assert_allclose(np.array(router.running_load), R, rtol=1e-6)
    np.testing.assert_allclose(np.array(router.bias), b, rtol=1e-5, atol=1e-7)
    assert not np.array(router.token_count).any()

    # SwitchHead: per-head E in the scale, H*E in the target, rate pre-multiplied by sqrt(E).
    sh = SwitchHead(16, 2, 3, 1, init_scale=0.5, bias_update_rate=0.01, bias_clip=None)
    cv = np.array([4.0, 0, 2, 1, 1, 0])
    sh.v_router.update_bias(mx.array(cv))
    sh.o_router.update_bias()
    Rv = 0.1 * cv / cv.sum()
    sv = float(sh.v_router.target_std) * math.sqrt(16 * 3)
    np.testing.assert_allclose(np.array(sh.v_router.bias),
                               -0.01 * math.sqrt(3) * sv * (Rv - 1 / 6) * 6, rtol=1e-5)
    # The o router saw no tokens: untouched, as in the reference.
    assert not np.array(sh.o_router.bias).any() and not np.array(sh.o_router.running_load).any()

    # Clipping at +-clip * s.
    router.bias_update_rate = 10.0
    router.update_bias(mx.array([8.0, 0.0, 0.0, 0.0]))
    assert np.abs(np.array(router.bias)).max() == pytest.approx(s, rel=1e-6)


def test_bias_balancing_evens_out_a_skewed_router():
    mx.random.seed(6)
    D, E, k = 16, 8, 2
    moe = SigmaMoE(D, E, 8, k, init_scale=1.0, bias_update_rate=0.05, bias_momentum=0.9)
    router = moe.router
    # Tokens share a strong common direction u, and expert 0's selector points along u.
    u = mx.random.normal((D,))
    u = u / mx.linalg.norm(u)
    row_norm = mx.linalg.norm(router.weight[1])
    router.weight = mx.concatenate([(u * row_norm)[None], router.weight[1:]])

    def loads():
        x = mx.random.normal((4, 64, D)) + 3 * u
        record = RoutingLog()
        moe(x, rms_norm(x), record=record)
        (counts,) = record.counts([router])
        c = np.array(counts)
        return c / c.sum(), counts

    s = float(router.target_std) * math.sqrt(D * E)
    first, _ = loads()
    assert first[0] > 0.45  # expert 0 takes (almost) every token's first slot
    history = []
    for _ in range(150):
        load, counts = loads()
        history.append(load.max())
        router.update_bias(counts)
        router.renorm()
        assert np.abs(np.array(router.bias)).max() <= s * (1 + 1e-6)
        assert not np.array(router.token_count).any()
    assert np.mean(history[-20:]) < 0.6 * first.max()
    assert np.array(router.bias)[0] < -0.1 * s  # the favoured expert was pushed down


def test_accumulated_counts_are_used_and_reset():
    router = SigmaMoE(16, 4, 8, 2, init_scale=0.5).router
    router.token_count = mx.array([4.0, 2.0, 1.0, 1.0])  # counts kept from earlier calls
    router.update_bias()
    np.testing.assert_allclose(np.array(router.running_load),
                               0.1 * np.array([4, 2, 1, 1]) / 8)
    assert not np.array(router.token_count).any()


def test_renorm_selectors():
    mx.random.seed(7)
    model = Toy(n_layers=1)
    block = model.layers[0]
    mlp, sa = block.mlp.router, block.self_attn
    mlp.weight = mlp.weight * mx.random.uniform(0.5, 3.0, (8, 1)) + 0.01
    sa.v_router.weight = sa.v_router.weight * 4
    sa.o_router.weight = sa.o_router.weight + 0.1
    for router in routers(model):
        router.renorm()
    for router in (mlp, sa.v_router, sa.o_router):
        _check_selector(router.weight, router.target_std, float(router.target_std))
    # Without bias balancing selectors are left alone (the reference trainer skips them).
    free = SigmaMoE(16, 4, 8, 2, init_scale=0.5, bias_balancing=False).router
    free.weight = free.weight * 3
    before = np.array(free.weight)
    free.renorm()
    np.testing.assert_array_equal(np.array(free.weight), before)


# --------------------------------------------------------------------------------------------
# mx.compile
# --------------------------------------------------------------------------------------------


def test_compiled_forward_backward_matches():
    mx.random.seed(8)
    model = Toy(n_layers=1)
    h = mx.random.normal((2, 8, 16))

    def loss_fn(h):
        record = RoutingLog()
        out = model(h, record=record)
        return (out ** 2).mean() + record.entropy_reg()

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
        rs = routers(model)

        def loss_fn(h):
            record = RoutingLog()
            out = model(h, record=record)
            return (out ** 2).mean() + record.entropy_reg(), record.counts(rs)

        def step(h):
            (loss, counts), grads = nn.value_and_grad(model, loss_fn)(h)
            for router, c in zip(rs, counts):
                router.update_bias(c)
            model.update(tree_map(lambda p, g: p - 0.1 * g, model.trainable_parameters(), grads))
            for router in rs:
                router.renorm()
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
        for a, b in zip(c1, c2, strict=True):
            np.testing.assert_array_equal(np.array(a), np.array(b))
    flat_e = dict(tree_flatten(eager.parameters()))
    for name, value in tree_flatten(compiled_model.parameters()):
        assert_close(value, flat_e[name], what=name)
    assert np.abs(np.array(flat_e["layers.0.mlp.router.bias"])).max() > 0


def test_model_directory_with_reference_names_loads(tmp_path):
    """A MoEUT directory saved before the routers were modules (the reference's names, experts
    stored [E, in, out]) loads into exactly the same weights."""
    from mlx_trm.checkpoint import WEIGHTS_FILE, load, save
    from mlx_trm.config import ModelConfig
    from mlx_trm.models import build_model

    mx.random.seed(0)
    model = build_model(ModelConfig(
        vocab_size=64, hidden_size=16, num_heads=2, L_layers=1, L_cycles=1, seq_len=16,
        use_moeut=True, moe_ff_n_experts=4, moe_ff_expert_size=8, moe_att_n_experts=2))
    out = save(tmp_path / "m", model)
    flat = dict(tree_flatten(model.parameters()))
    legacy = to_reference_names(flat)
    assert legacy["L_level.layers.0.mlp.keys"].shape == (4, 16, 8)
    assert "L_level.layers.0.self_attn.expert_v_bias" in legacy
    mx.save_safetensors(str(out / WEIGHTS_FILE), legacy)
    loaded, _ = load(out)
    for key, value in tree_flatten(loaded.parameters()):
        np.testing.assert_array_equal(np.array(value), np.array(flat[key]), err_msg=key)
