"""Our models under mlx-lm's cache machinery: batched generation, prompt-cache files, KV options.

``model.make_cache()`` returns stock ``mlx_lm.models.cache.KVCache`` slots (one per layer
application), so mlx-lm's ``BatchGenerator`` merges them into its left-padded ``BatchKVCache``
and our attention reads per-row array offsets and padding masks.
"""

from __future__ import annotations

import types

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_trm.config import ModelConfig
from mlx_trm.interop import Model as InteropModel
from mlx_trm.interop import model as interop  # where Model.__call__ reads its helpers
from tests.conftest import model_kinds

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.generate import batch_generate, generate_step  # noqa: E402
from mlx_lm.models import cache as lm_cache  # noqa: E402

MOE = dict(use_moeut=True, moe_ff_n_experts=4, moe_ff_expert_size=16, moe_ff_k=2,
           moe_att_n_experts=4, moe_att_k=2)
KINDS = model_kinds(MOE)
PROMPTS = [[5, 17, 3, 42, 8, 61], [9], list(range(30, 41))]
N = 10
# batch_generate decodes the ids at the end; no token is an end-of-sequence here
TOKENIZER = types.SimpleNamespace(eos_token_ids=[], decode=str)


def tiny_model(kind: str, hidden_size: int = 16) -> InteropModel:
    """A few-thousand-parameter model whose greedy ids vary (scaled-up random weights: the
    reference init repeats one token, which would hide a misaligned row)."""
    mx.random.seed(1)
    model = InteropModel(ModelConfig(vocab_size=97, hidden_size=hidden_size, num_heads=2,
                                     expansion=2, L_layers=2, H_cycles=2, L_cycles=2,
                                     seq_len=64, **KINDS[kind]))
    new = [(k, 1.2 * mx.random.normal(v.shape) / v.shape[-1] ** 0.5)
           for k, v in tree_flatten(model.parameters()) if v.ndim >= 2 and "embed" not in k]
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model


def single(model, prompt: list[int], **kwargs) -> tuple[list[int], list[np.ndarray]]:
    steps = list(generate_step(mx.array(prompt), model, max_tokens=N, **kwargs))
    return [int(t) for t, _ in steps], [np.array(lp) for _, lp in steps]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.usefixtures("kernels")  # both sets of branches (conftest.py)
def test_batch_generate_rows_equal_one_prompt_at_a_time(kind):
    model = tiny_model(kind)
    assert all(type(c) is lm_cache.KVCache for c in model.make_cache())
    batched = batch_generate(model, TOKENIZER, PROMPTS, max_tokens=N, return_token_ids=True,
                             return_logprobs=True)
    alone = [single(model, p) for p in PROMPTS]
    assert batched.token_ids == [ids for ids, _ in alone]
    assert len({tuple(ids) for ids in batched.token_ids}) == len(PROMPTS)
    assert any(len(set(ids)) > 1 for ids in batched.token_ids)
    for row, (ids, lps) in zip(batched.logprobs, alone):
        assert np.abs(np.array(row) - np.array([lp[t] for t, lp in zip(ids, lps)])).max() <= 1e-4


@pytest.mark.usefixtures("kernels")  # both sets of branches (conftest.py)
def test_prompt_cache_file_round_trip(tmp_path):
    """mlx_lm.cache_prompt's save_prompt_cache, then load_prompt_cache + the prompt's rest,
    gives the whole prompt's greedy ids and logits."""
    model = tiny_model("moeut_act")
    prefix, rest = PROMPTS[2], [7, 11, 13]
    cache = lm_cache.make_prompt_cache(model)
    model(mx.array([prefix]), cache=cache)
    mx.eval([c.state for c in cache])
    lm_cache.save_prompt_cache(str(tmp_path / "p.safetensors"), cache, {"model": "tiny"})
    loaded = lm_cache.load_prompt_cache(str(tmp_path / "p.safetensors"))
    assert len(loaded) == model.num_cache_slots and loaded[0].offset == len(prefix)
    assert single(model, rest, prompt_cache=loaded)[0] == single(model, prefix + rest)[0]


def test_trimmed_prompt_cache_is_exact():
    """The server trims a cached prompt to the common prefix of the next request."""
    model = tiny_model("dense_act")
    a, b, c = PROMPTS[2], [3, 4, 5, 6], [50, 60]
    cache = lm_cache.make_prompt_cache(model)
    model(mx.array([a + b]), cache=cache)
    assert lm_cache.trim_prompt_cache(cache, len(b)) == len(b)
    trimmed = model(mx.array([c]), cache=cache)
    assert np.abs(np.array(trimmed - model(mx.array([a + c]))[:, -len(c):])).max() <= 1e-4


def test_kv_bits_quantizes_every_slot_and_stays_close():
    model = tiny_model("dense_act", hidden_size=64)  # head_dim 32: one quantization group
    prompt = PROMPTS[2]
    cache = lm_cache.make_prompt_cache(model)
    ids, lps = single(model, prompt, prompt_cache=cache, kv_bits=8, kv_group_size=32,
                      quantized_kv_start=0)
    assert all(isinstance(c, lm_cache.QuantizedKVCache) for c in cache)
    ref_ids, ref_lps = single(model, prompt)
    assert ids[:3] == ref_ids[:3]
    assert np.abs(lps[0] - ref_lps[0]).max() < 0.05


def test_max_kv_size_is_ignored_and_the_output_stays_exact():
    """mlx-lm does not pass --max-kv-size on to a model's own make_cache (documented in
    mlx_trm.interop): every key is kept, so the ids are those of a run without it."""
    model = tiny_model("dense")
    plain = [int(t) for t, _ in generate_step(mx.array(PROMPTS[2]), model, max_tokens=N)]
    limited = [int(t) for t, _ in generate_step(mx.array(PROMPTS[2]), model, max_tokens=N,
                                                max_kv_size=4)]
    assert limited == plain
    assert all(type(c) is lm_cache.KVCache
               for c in lm_cache.make_prompt_cache(model, max_kv_size=4))


def test_mlx_lm_cache_api_is_what_the_compiled_step_reads():
    """mlx_trm.interop drives mlx-lm's slots through their public API only: KVCache's keys,
    values, offset and step; BatchKVCache's five-field state (keys, values, offset, left
    padding, write column), read and written back. This fails by name if an mlx-lm upgrade
    changes either."""
    k = mx.ones((2, 1, 3, 4))
    plain = lm_cache.KVCache()
    plain.update_and_fetch(k, k)
    assert plain.offset == 3 and plain.keys.shape[2] >= 3 and isinstance(plain.step, int)
    batch = lm_cache.BatchKVCache([1, 0])
    batch.update_and_fetch(k, k)
    keys, values, offset, left_padding, column = batch.state
    assert column == 3 and keys.shape[2] >= 3 and offset.tolist() == [2, 3]
    assert left_padding.tolist() == [1, 0]
    batch.state = (keys, values, offset + 1, left_padding, column + 1)
    assert batch.state[4] == 4 and batch.offset.tolist() == [3, 4]
    assert interop.write_column([batch]) == 4 and interop.write_column([plain]) == 3


def count_compiled_calls(monkeypatch) -> list:
    """A list that grows by one per call of the compiled mlx-lm decode step."""
    calls: list = []
    compiled = interop.decode_into_mlx_lm_cache
    monkeypatch.setattr(interop, "decode_into_mlx_lm_cache",
                        lambda *a: calls.append(1) or compiled(*a))
    return calls


@pytest.mark.parametrize("kind", ["flat", "dense_act", "moeut_act"])
def test_mlx_lm_decode_runs_the_compiled_step_and_equals_the_eager_one(kind, monkeypatch):
    """generate_step's one-token calls take the compiled decoder on the KVCache buffers
    (mlx_trm.interop.model.decode_into_mlx_lm_cache): ids and logprobs equal the eager path's,
    through several buffer growths (KVCache.step cut to 8), and the slots end as eager ones
    would."""
    model = tiny_model(kind)
    monkeypatch.setattr(lm_cache.KVCache, "step", 8)
    calls = count_compiled_calls(monkeypatch)

    def run() -> tuple[list[int], list[np.ndarray], list]:
        cache = lm_cache.make_prompt_cache(model)
        steps = list(generate_step(mx.array(PROMPTS[0]), model, max_tokens=30,
                                   prompt_cache=cache))
        return [int(t) for t, _ in steps], [np.array(lp) for _, lp in steps], cache

    ids, lps, cache = run()
    assert len(calls) >= 28  # every decode call after the prefill's first token
    monkeypatch.setattr(interop, "write_column", lambda c: None)  # the eager path
    eager_ids, eager_lps, eager_cache = run()
    assert ids == eager_ids
    assert np.abs(lps[0] - lps[-1]).max() > 1e-3  # the distributions move along the sequence
    assert max(np.abs(a - b).max() for a, b in zip(lps, eager_lps)) <= 1e-4
    for c, e in zip(cache, eager_cache):
        assert c.offset == e.offset
        k, ek = c.keys[..., :c.offset, :], e.keys[..., :e.offset, :]
        assert np.abs(np.array(k) - np.array(ek)).max() <= 1e-4


@pytest.mark.parametrize("kind", ["flat", "dense_act", "moeut_act"])
def test_batch_generate_compiled_step_equals_the_eager_one(kind, monkeypatch):
    """mlx-lm's batched decode (left-padded BatchKVCache slots, as the server uses) takes the
    compiled step too, with the same ids and logprobs as eager batched decoding."""
    model = tiny_model(kind)
    calls = count_compiled_calls(monkeypatch)

    def run():
        return batch_generate(model, TOKENIZER, PROMPTS, max_tokens=N, return_token_ids=True,
                              return_logprobs=True)

    fast = run()
    assert calls
    monkeypatch.setattr(interop, "write_column", lambda c: None)  # the eager path
    eager = run()
    assert fast.token_ids == eager.token_ids
    for a, b in zip(fast.logprobs, eager.logprobs):
        assert np.abs(np.array(a) - np.array(b)).max() <= 1e-4
