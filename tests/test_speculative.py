"""Speculative recursion is exact: the same greedy ids (and the same samples of a deterministic
sampler) as plain full-depth decoding, whatever the drafts, the batch, K or the limits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_trm.checkpoint import load
from mlx_trm.config import ConfigError
from mlx_trm.generation import decoders
from mlx_trm.generation.decoders import CachedDecoder
from mlx_trm.generation.generate import generate_tokens, stream_generate
from mlx_trm.generation.sampling import make_sampler
from mlx_trm.generation.speculative import SpeculativeDecoder, speculation
from tests.test_generate import PROMPT, model_dir, run_cli, small_model  # noqa: F401

PROMPTS = [PROMPT, [9, 4], list(range(30, 41))]


def mixed_model(kind: str, scale: float = 0.8, seed: int = 2) -> tuple[object, int]:
    """A small model whose first two ACT steps agree with all three on some tokens, not all
    (the drafts are then both accepted and rejected), and the draft steps to use: dense TRM +
    ACT with the reference init, or ``kind`` with random weights of std ``scale`` / sqrt(fan-in)
    (found by trying a few: the reference init of the MoE model repeats one token)."""
    if kind == "dense_act" and seed == 2:
        return small_model("dense_act"), 2
    model = small_model(kind, halt_max_steps=3)
    mx.random.seed(seed)
    model.update(tree_unflatten([(k, scale * mx.random.normal(v.shape) / v.shape[-1] ** 0.5)
                                 for k, v in tree_flatten(model.parameters())
                                 if v.ndim >= 2 and "embed" not in k]))
    return model, 2


def ids(prompts, model, n, **kwargs) -> list[list[int]]:
    return [y.tolist() for y, _ in generate_tokens(prompts, model, max_tokens=n, **kwargs)]


@pytest.mark.parametrize("kind", ["dense_act", "moeut_act"])
@pytest.mark.parametrize("k", [2, 4])
def test_greedy_ids_equal_plain_decoding(kind, k):
    model, steps = mixed_model(kind)
    spec = speculation(model, k, draft_steps=steps)
    assert ids([PROMPT], model, 40, speculation=spec) == ids([PROMPT], model, 40)
    assert 0 < spec.accepted < spec.drafted  # drafts were both kept and rejected
    assert 1 < spec.tokens_per_pass <= k + 1


def test_batch_of_prompts_of_different_lengths_equals_plain_decoding():
    model, steps = mixed_model("moeut_act")
    spec = speculation(model, 3, draft_steps=steps)
    assert ids(PROMPTS, model, 30, speculation=spec) == ids(PROMPTS, model, 30)
    assert 0 < spec.accepted < spec.drafted


def test_a_sampled_token_is_the_verifiers_own():
    """With a sampler that is a fixed function of the distribution (a perturbed argmax), the
    speculative tokens equal plain decoding's only if every emitted token is the verifier's
    sample from the full-depth distribution."""
    model, steps = mixed_model("dense_act")
    weights = mx.random.uniform(0.2, 1.8, (model.args.vocab_size,), key=mx.random.key(5))

    def sampler(logprobs):
        return mx.argmax(logprobs * weights, axis=-1)

    spec = speculation(model, 4, draft_steps=steps)
    sampled = ids([PROMPT], model, 30, sampler=sampler, speculation=spec)
    assert sampled == ids([PROMPT], model, 30, sampler=sampler)
    assert sampled != ids([PROMPT], model, 30)  # not the greedy ids
    # a real temperature sampler runs and reproduces from its seed
    runs = []
    for _ in range(2):
        mx.random.seed(3)
        runs.append(ids([PROMPT], model, 20, sampler=make_sampler(1.0),
                        speculation=speculation(model, 4, draft_steps=steps)))
    assert runs[0] == runs[1] and len({t for (t,) in runs[0]}) > 1


@pytest.mark.parametrize("n", [1, 3, 7])
def test_max_tokens_and_k_past_what_is_left_stop_inside_a_round(n):
    model, steps = mixed_model("dense_act")
    plain = ids([PROMPT], model, n)
    assert len(plain) == n
    for k in (2, 8):
        assert ids([PROMPT], model, n, speculation=speculation(model, k, draft_steps=steps)) \
            == plain


def test_seq_len_and_the_cache_capacity_are_passed_inside_a_round(monkeypatch):
    """A prompt near seq_len (64) decoding past it, with buffers grown 8 columns at a time, so
    rounds of K + 1 positions straddle every growth."""
    monkeypatch.setattr(decoders, "CACHE_BLOCK", 8)
    monkeypatch.setattr(decoders, "WINDOW_BLOCK", 4)
    model, steps = mixed_model("dense_act")
    prompt = [int(t) for t in mx.random.randint(1, 97, (60,), key=mx.random.key(4))]
    spec = speculation(model, 4, draft_steps=steps)
    assert ids([prompt], model, 20, speculation=spec) == ids([prompt], model, 20)


def test_a_separate_draft_model_is_exact():
    model, _ = mixed_model("dense_act")
    spec = speculation(model, 3, draft_model=small_model("flat", seed=2))
    assert ids(PROMPTS, model, 24, speculation=spec) == ids(PROMPTS, model, 24)
    assert spec.rounds > 0 and spec.drafted == 3 * spec.rounds


def test_the_cache_after_a_rejection_is_the_plain_decoders():
    model, steps = mixed_model("dense_act")
    spec = speculation(model, 4, draft_steps=steps)
    dec = SpeculativeDecoder(model, [PROMPT], 40, speculation=spec)
    greedy = lambda logits: (mx.argmax(logits, axis=-1), logits)  # noqa: E731
    y = greedy(dec.prefill())[0]
    emitted = [y]
    for _ in range(10):  # rounds until one rejects a draft
        out = dec.step(y, greedy)
        emitted += [t for t, _ in out]
        y = emitted[-1]
        if len(out) < 5:
            break
    assert len(out) < 5, "no round rejected a draft"
    plain = CachedDecoder(model, [PROMPT], 40)
    plain.prefill()
    for t in emitted[:-1]:  # the last emitted token is not in either cache yet
        plain(t)
    assert dec.length == plain.length == len(PROMPT) + len(emitted) - 1
    for a, b in zip(dec.cache, plain.cache):
        for x, z in ((a.keys, b.keys), (a.values, b.values)):
            x, z = np.array(x[..., :plain.length, :]), np.array(z[..., :plain.length, :])
            assert np.abs(x - z).max() <= 1e-4


def test_an_end_of_story_inside_an_accepted_run_stops_the_story(model_dir, monkeypatch):  # noqa: F811
    model, steps = mixed_model("dense_act", 0.7, seed=3)  # rounds of 3.6 tokens on average
    _, tokenizer = load(model_dir)  # the packaged tokenizer; the model's 97 ids are its first
    rounds: list[int] = []
    step = SpeculativeDecoder.step
    monkeypatch.setattr(SpeculativeDecoder, "step",
                        lambda self, *a: (out := step(self, *a), rounds.append(len(out)))[0])
    full = [r.token for r in stream_generate(model, tokenizer, PROMPT, 30, ignore_eos=True,
                                             speculation=speculation(model, 4, draft_steps=steps))]
    assert [[t] for t in full] == ids([PROMPT], model, 30)
    ends = np.cumsum([1] + rounds)  # tokens emitted when each round (the prefill first) ends
    # a token first seen inside a round, with more of the round after it
    inside = [i for i in range(1, len(full)) if full.index(full[i]) == i and i + 1 not in ends]
    assert inside, "no new token inside a round"
    eos = full[inside[0]]

    class Tokenizer:
        def __getattr__(self, name):
            return getattr(tokenizer, name)
        eos_id = eos

    story = list(stream_generate(model, Tokenizer(), PROMPT, 30,
                                 speculation=speculation(model, 4, draft_steps=steps)))
    assert [r.token for r in story] == full[:inside[0] + 1]
    assert story[-1].finish_reason == "stop"


def test_flat_models_and_bad_settings_are_refused_in_one_line():
    flat = small_model("flat")
    with pytest.raises(ConfigError, match="is a flat transformer.*--draft-model"):
        speculation(flat, 3, draft_steps=1)
    model = small_model("dense_act")  # 3 ACT steps
    with pytest.raises(ConfigError, match="between 1 and 2"):
        speculation(model, 3, draft_steps=3)
    with pytest.raises(ConfigError, match="--num-draft-tokens"):
        speculation(model, 0, draft_steps=1)
    with pytest.raises(ConfigError, match="either"):
        speculation(model, 3)
    with pytest.raises(ConfigError, match="drop one"):
        ids([PROMPT], model, 4, speculation=speculation(model, 3, draft_steps=1),
            halt_policy=object())


def test_cli_prints_the_acceptance_and_refuses_bad_pairs(model_dir, capsys):  # noqa: F811
    out = run_cli(capsys, ["--model", str(model_dir), "--prompt", "Once upon a time",
                           "--max-tokens", "8", "--draft-steps", "1", "--num-draft-tokens", "4"])
    assert "Draft acceptance:" in out.out and "tokens per verification pass" in out.out
    for argv, fix in ((["--num-draft-tokens", "4"], "--draft-steps"),
                      (["--draft-steps", "1", "--adaptive-halt", "kl"], "drop one"),
                      (["--draft-steps", "2"], "between 1 and 1")):
        with pytest.raises(SystemExit) as e:
            run_cli(capsys, ["--model", str(model_dir), "--max-tokens", "4", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and fix in err[0]
