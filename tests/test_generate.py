"""Generation: the recursion-aware KV cache is exact, samplers, batching, the CLI."""

from __future__ import annotations

import importlib
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from mlx_trm.checkpoint import load
from mlx_trm.cli import generate as gen  # noqa: E402  (the command: gen.main)
from mlx_trm.config import ConfigError, ModelConfig
from mlx_trm.data.tokenizer import decode_continuation
from mlx_trm.generation.decoders import CachedDecoder
from mlx_trm.generation.generate import (
    batch_generate,
    check_length,
    encode_prompt,
    generate,
    generate_step,
    generate_tokens,
    stream_generate,
)
from mlx_trm.generation.sampling import make_sampler
from mlx_trm.models import build_model
from tests.conftest import model_kinds, reference_cases, save_small_model

decoders = importlib.import_module("mlx_trm.generation.decoders")  # where the cache blocks are read

MOE = dict(use_moeut=True, moe_ff_n_experts=4, moe_ff_expert_size=8, moe_ff_k=2,
           moe_att_n_experts=2, moe_att_k=1)
KINDS = model_kinds(MOE)
PROMPT = [5, 17, 3, 42, 8, 61]


def small_model(kind: str = "dense_act", seed: int = 0, **overrides) -> object:
    """A few-thousand-parameter model of each kind (H_cycles 2 exercises the no-grad cycles)."""
    args = dict(vocab_size=97, hidden_size=16, num_heads=2, expansion=2, L_layers=2, H_cycles=2,
                L_cycles=2, seq_len=64)
    args.update(KINDS[kind])
    args.update(overrides)
    mx.random.seed(seed)
    model = build_model(ModelConfig(**args))
    mx.eval(model.parameters())
    return model


def decoded_logits(model, seq: list[int], prefill: int = 1, **kwargs) -> np.ndarray:
    """Logits at every position: prefill ``seq[:prefill]``, then decode one token at a time."""
    decode = CachedDecoder(model, [seq[:prefill]], len(seq), **kwargs)
    out = [decode.prefill()[0]] + [decode(mx.array([t]))[0] for t in seq[prefill:]]
    return np.array(mx.stack(out))


def full_logits(model, seq: list[int]) -> np.ndarray:
    return np.array(model(mx.array([seq]))[0])


def greedy_ids(model, prompt, n, **kwargs) -> list[int]:
    return [t for t, _ in generate_step(prompt, model, max_tokens=n, **kwargs)]


# ----------------------------------------------------------------------------------------------
# The cache is exact


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_logits_equal_full_forward_at_every_position(kind):
    model = small_model(kind)
    seq = PROMPT + [int(t) for t in mx.random.randint(1, 97, (20,), key=mx.random.key(1))]
    full = full_logits(model, seq)
    assert np.abs(decoded_logits(model, seq)[1:] - full[1:]).max() <= 1e-4
    # prefilled prompt, then decode: the positions after the prompt
    cached = decoded_logits(model, seq, prefill=len(PROMPT))
    assert np.abs(cached - full[len(PROMPT) - 1:]).max() <= 1e-4


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.usefixtures("kernels")  # both sets of branches (conftest.py)
def test_cached_greedy_and_sampled_ids_equal_uncached(kind):
    model = small_model(kind)
    assert greedy_ids(model, PROMPT, 16) == greedy_ids(model, PROMPT, 16, use_cache=False)
    # sampling from the same seed draws the same tokens when the logits agree
    sampler = make_sampler(temp=1.0)
    runs = []
    for use_cache in (True, False):
        mx.random.seed(7)
        runs.append(greedy_ids(model, PROMPT, 16, sampler=sampler, use_cache=use_cache))
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1


@pytest.mark.parametrize("kind", ["dense_act", "moeut_act"])
def test_attention_window_stays_exact_across_its_blocks(kind, monkeypatch):
    # decode attention reads the written columns rounded up to WINDOW_BLOCK: a small block makes
    # the window (and the compiled trace) change many times within the sequence
    monkeypatch.setattr(decoders, "WINDOW_BLOCK", 4)
    model = small_model(kind)
    seq = PROMPT + [int(t) for t in mx.random.randint(1, 97, (24,), key=mx.random.key(2))]
    full = full_logits(model, seq)
    assert np.abs(decoded_logits(model, seq, prefill=3) - full[2:]).max() <= 1e-4


def test_cached_decode_runs_blas_on_one_thread_then_restores_it():
    from mlx_trm.blas import _openblas

    lib = _openblas()
    if lib is None:
        pytest.skip("OpenBLAS is not loaded in this process (LD_PRELOAD it, as .ci/run does)")
    before = lib.openblas_get_num_threads()
    lib.openblas_set_num_threads(2)
    try:
        model = small_model("dense")
        seen = [lib.openblas_get_num_threads()
                for _ in generate_tokens([PROMPT], model, max_tokens=3)]
        assert seen == [1, 1, 1]
        assert lib.openblas_get_num_threads() == 2
        # the full re-forward multiplies whole sequences: it keeps every thread
        seen = [lib.openblas_get_num_threads()
                for _ in generate_tokens([PROMPT], model, max_tokens=2, use_cache=False)]
        assert seen == [2, 2]
    finally:
        lib.openblas_set_num_threads(before)


def test_slot_count_is_one_per_layer_application():
    model = small_model("dense_act")  # 3 ACT steps * 2 H cycles * (2 + 1) stages * 2 layers
    assert model.num_cache_slots == 36 == len(model.make_cache())
    assert small_model("flat").num_cache_slots == 2
    with pytest.raises(ValueError, match="slots"):
        model(mx.array([PROMPT]), cache=small_model("dense").make_cache())


@pytest.mark.parametrize("kind", ["dense_act", "moeut_act"])
def test_compiled_decode_equals_eager(kind):
    model = small_model(kind)
    seq = PROMPT + list(range(20, 40))
    compiled = decoded_logits(model, seq, prefill=4, compile=True)
    eager = decoded_logits(model, seq, prefill=4, compile=False)
    assert np.abs(compiled - eager).max() <= 1e-5
    assert greedy_ids(model, PROMPT, 10) == greedy_ids(model, PROMPT, 10, compile=False)


def test_chunked_prefill_equals_one_shot():
    model = small_model("dense_act")
    seq = PROMPT + list(range(20, 37))
    one_shot = CachedDecoder(model, [seq], 4).prefill()
    chunked = CachedDecoder(model, [seq], 4, prefill_step_size=5).prefill()
    # Equal to float re-association: the attention matmuls of a 5-query chunk and of all 21
    # queries round differently (3e-5 on logits up to 2.9, through 4 ACT steps of recursion).
    assert np.abs(np.array(one_shot) - np.array(chunked)).max() <= 5e-5
    assert (greedy_ids(model, seq, 8, prefill_step_size=5)
            == greedy_ids(model, seq, 8, prefill_step_size=512))


@pytest.mark.parametrize("kind", ["dense_act", "moeut_act", "flat"])
def test_mlx_lm_style_cache_chunked_prefill_decode_and_trim(kind):
    """model.make_cache() driven as mlx-lm does: chunks at non-zero offsets, T=1 steps, trim."""
    model = small_model(kind)
    seq = PROMPT + list(range(20, 34))
    full = full_logits(model, seq)
    cache = model.make_cache()
    chunks = [seq[:4], seq[4:11]] + [[t] for t in seq[11:]]
    outs = [model(mx.array([chunk]), cache=cache)[0] for chunk in chunks]
    mx.eval([c.state for c in cache])
    assert all(isinstance(c.offset, int) and c.offset == len(seq) for c in cache)
    assert np.abs(np.array(mx.concatenate(outs)) - full).max() <= 1e-4
    # trimming every slot by n is exact: continue from the shorter sequence
    assert all(c.is_trimmable() for c in cache)
    assert [c.trim(5) for c in cache][0] == 5
    again = model(mx.array([seq[-5:]]), cache=cache)[0]
    assert np.abs(np.array(again) - full[-5:]).max() <= 1e-4


@pytest.mark.parametrize("kind", ["dense_act", "moeut_act", "flat"])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.usefixtures("kernels")  # both sets of branches (conftest.py)
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(kind, use_cache):
    model = small_model(kind, seed=1)
    prompts = [PROMPT, [9], list(range(30, 41))]
    rows = [[] for _ in prompts]
    logprobs = [[] for _ in prompts]
    for y, lp in generate_tokens(prompts, model, max_tokens=10, use_cache=use_cache):
        for i, t in enumerate(y.tolist()):
            rows[i].append(t)
            logprobs[i].append(np.array(lp[i]))
    for i, prompt in enumerate(prompts):
        alone = list(generate_step(prompt, model, max_tokens=10))
        assert rows[i] == [t for t, _ in alone]
        assert np.abs(np.stack(logprobs[i]) - np.stack([lp for _, lp in alone])).max() <= 1e-4


def test_cache_grows_past_its_first_capacity(monkeypatch):
    monkeypatch.setattr(decoders, "CACHE_BLOCK", 8)
    model = small_model("dense")
    ids = []
    for t, _ in generate_step(PROMPT, model, max_tokens=-1):  # unbounded: grown block by block
        ids.append(t)
        if len(ids) == 20:
            break
    assert ids == greedy_ids(model, PROMPT, 20, use_cache=False)


# ----------------------------------------------------------------------------------------------
# Test-time recursion overrides


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp("gen") / "model", seq_len=48)


@pytest.mark.parametrize("override", [{"halt_max_steps": 8}, {"L_cycles": 4}])
def test_recursion_override_changes_logits_and_stays_cache_exact(model_dir, override):
    base, _ = load(model_dir)
    model, _ = load(model_dir, model_config=override)
    assert model.num_cache_slots > base.num_cache_slots
    seq = [int(t) for t in mx.random.randint(1, 10000, (12,), key=mx.random.key(2))]
    full = full_logits(model, seq)
    assert np.abs(full - full_logits(base, seq)).max() > 1e-3
    assert np.abs(decoded_logits(model, seq) - full).max() <= 1e-4
    assert greedy_ids(model, seq, 8) == greedy_ids(model, seq, 8, use_cache=False)


# ----------------------------------------------------------------------------------------------
# Reference checkpoints: cached greedy ids equal the reference's re-forward loop


@pytest.mark.parametrize("folder", reference_cases())
def test_reference_greedy_continuation_with_the_cache(converted, folder):
    model, _ = load(converted(folder))
    e = np.load(folder / "expected.npz")
    prompt, expected = e["greedy_prompt"].tolist(), e["greedy_continuation"].tolist()
    ids = []
    for t, _ in generate_step(prompt, model, max_tokens=len(expected)):
        if t == 0:  # end-of-story, as the reference loop
            break
        ids.append(t)
    if ids != expected:
        # Only a MoE routing near-tie may flip a choice (top-k is discontinuous); the reference's
        # margin behind the first differing token must then be tiny.
        assert model.args.use_moeut, f"dense cached greedy ids differ: {ids} vs {expected}"
        first = next(i for i, (a, b) in enumerate(zip(ids, expected)) if a != b)
        assert e["greedy_top2_margin"][first] < 1e-3
    # logits at every position of prompt + continuation, cached vs full forward
    seq = prompt + ids
    assert np.abs(decoded_logits(model, seq) - full_logits(model, seq)).max() <= 1e-4


def test_reference_model_halt_override_changes_the_story_and_stays_exact(converted):
    from tests.conftest import FIXTURES

    folder = FIXTURES / "trm_tinystories_1m"
    prompt = np.load(folder / "expected.npz")["greedy_prompt"].tolist()
    default, _ = load(converted(folder))
    more, _ = load(converted(folder), model_config={"halt_max_steps": 8})
    assert more.num_cache_slots == 112
    ids = greedy_ids(more, prompt, 10)
    assert ids == greedy_ids(more, prompt, 10, use_cache=False)
    assert ids != greedy_ids(default, prompt, 10)


def test_mlx_lm_generate_step_drives_the_model():
    """mlx-lm's own loop: model.make_cache(), chunked prefill, c.state evaluation, T=1 steps."""
    lm_generate = pytest.importorskip("mlx_lm.generate")
    model = small_model("dense_act")
    prompt = PROMPT + list(range(20, 30))
    theirs = list(lm_generate.generate_step(mx.array(prompt), model, max_tokens=8,
                                            prefill_step_size=5))
    ours = list(generate_step(prompt, model, max_tokens=8))
    assert [int(t) for t, _ in theirs] == [t for t, _ in ours]
    assert max(float(mx.abs(a - b).max()) for (_, a), (_, b) in zip(theirs, ours)) <= 1e-4


# ----------------------------------------------------------------------------------------------
# Samplers


def test_top_k_top_p_min_p_filter():
    lp = mx.log(mx.array([[0.4, 0.2, 0.2, 0.1, 0.1]]))
    kept = lambda out: np.isfinite(np.array(out))[0].tolist()  # noqa: E731
    assert kept(apply_top_k(lp, 1)) == [True, False, False, False, False]
    # mlx-lm's top-k keeps exactly k (the reference's kept ties with the k-th as well)
    assert kept(apply_top_k(lp, 2)).count(True) == 2 and kept(apply_top_k(lp, 2))[0]
    # mlx-lm's top-p cuts at a log-probability: a tie at the cut keeps both tied tokens
    assert kept(apply_top_p(lp, 0.5)) == [True, True, True, False, False]
    assert kept(apply_top_p(lp, 0.85)) == [True] * 5  # the two 0.1s tie at the cut
    assert kept(apply_top_p(lp, 0.3)) == [True, False, False, False, False]
    assert kept(apply_min_p(lp, 0.5)) == [True, True, True, False, False]
    assert kept(apply_min_p(lp, 0.2)) == [True] * 5
    assert np.array_equal(np.array(apply_top_k(lp, 1))[0, :1], np.array(lp)[0, :1])


def test_samplers_draw_only_kept_tokens_and_seed_reproduces():
    lp = mx.log(mx.array([[0.05, 0.3, 0.3, 0.3, 0.05]] * 64))
    for sampler in (make_sampler(1.0, top_k=3), make_sampler(1.0, top_p=0.85),
                    make_sampler(1.0, min_p=0.5)):
        mx.random.seed(0)
        draws = set(np.array(sampler(lp)).tolist())
        assert draws == {1, 2, 3}
    sampler = make_sampler(0.8, top_k=4)
    mx.random.seed(3)
    a = sampler(lp).tolist()
    mx.random.seed(3)
    assert sampler(lp).tolist() == a


def test_repetition_penalty_is_mlx_lms_processor_per_row():
    from mlx_lm.sample_utils import make_repetition_penalty

    model = small_model("dense_act")
    prompts = [PROMPT, PROMPT[2:]]
    n, penalty, context = 12, 3.0, 5
    processors = make_logits_processors(repetition_penalty=penalty,
                                        repetition_context_size=context)
    got = [y.tolist() for y, _ in generate_tokens(prompts, model, max_tokens=n,
                                                  logits_processors=processors)]
    plain = [y.tolist() for y, _ in generate_tokens(prompts, model, max_tokens=n)]
    assert got != plain  # the penalty changes greedy output on this model
    # by hand: full forward over each row's history, mlx-lm's processor, argmax
    processor = make_repetition_penalty(penalty, context)
    for row, prompt in enumerate(prompts):
        history = list(prompt)
        for step in range(n):
            logits = model(mx.array([history]))[:, -1]
            logits = processor(mx.array(history), logits)
            token = int(mx.argmax(logits, axis=-1).item())
            assert token == got[step][row], (row, step)
            history.append(token)


def test_temperature_zero_is_argmax():
    lp = mx.log(mx.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    assert make_sampler(0.0, top_k=2).__name__ == "greedy"
    assert make_sampler(0.0)(lp).tolist() == [1, 0]
    with pytest.raises(ConfigError):
        make_sampler(-1.0)


def test_seeded_sampling_is_reproducible_end_to_end():
    model = small_model("dense_act")
    runs = []
    for _ in range(2):
        mx.random.seed(11)
        runs.append(greedy_ids(model, PROMPT, 12, sampler=make_sampler(1.0, top_k=20)))
    assert runs[0] == runs[1]


# ----------------------------------------------------------------------------------------------
# Text, stopping, lengths


class CountingSampler:
    """Greedy, except that the n-th call draws end-of-story (id 0)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, logprobs):
        self.calls += 1
        y = mx.argmax(logprobs, axis=-1)
        return mx.zeros_like(y) if self.calls == self.n else y


def test_stream_generate_stops_at_end_of_story(model_dir):
    model, tokenizer = load(model_dir)
    responses = list(stream_generate(model, tokenizer, "Once upon a time", 20,
                                     sampler=CountingSampler(4)))
    assert len(responses) == 4 and responses[-1].finish_reason == "stop"
    assert responses[-1].text == "" and responses[-1].token == 0
    full = list(stream_generate(model, tokenizer, "Once upon a time", 20,
                                sampler=CountingSampler(4), ignore_eos=True))
    assert len(full) == 20 and full[-1].finish_reason == "length"
    prompt = tokenizer.encode("Once upon a time")
    text = tokenizer.decode(prompt + [r.token for r in full])
    assert "".join(r.text for r in full) == text[len(tokenizer.decode(prompt)):]


def test_batch_generate_rows_stop_independently(model_dir):
    model, tokenizer = load(model_dir)
    prompts = ["Once upon a time", "One day, a little girl named Lily"]
    result = batch_generate(model, tokenizer, prompts, 6, sampler=CountingSampler(3))
    assert result.finish_reasons == ["stop", "stop"] and all(len(t) == 2 for t in result.tokens)
    alone = [[t for t, _ in generate_step(tokenizer.encode(p), model, max_tokens=6)]
             for p in prompts]
    result = batch_generate(model, tokenizer, prompts, 6, batch_size=1)
    assert result.tokens == alone and result.finish_reasons == ["length", "length"]
    assert result.stats.generation_tokens == 12


def test_prompt_length_checks():
    model = small_model("dense")  # seq_len 64
    with pytest.raises(ConfigError, match="at most 64"):
        check_length(model, 65, 1)
    assert "past the trained length" in check_length(model, 60, 10)
    assert check_length(model, 10, 54) is None
    with pytest.raises(ConfigError, match="empty"):
        list(generate_step([], model, max_tokens=3))


# ----------------------------------------------------------------------------------------------
# Command line


def run_cli(capsys, argv):
    gen.main(argv)
    return capsys.readouterr()


def test_cli_streams_text_and_prints_the_stats_block(model_dir, capsys):
    out = run_cli(capsys, ["--model", str(model_dir), "--prompt", "Once upon a time",
                           "--max-tokens", "8", "--temp", "0.7", "--top-k", "40", "--seed", "1",
                           "--ignore-eos"]).out
    lines = out.splitlines()
    assert lines[0] == "==========" and lines[1].startswith("Once upon a time")
    assert lines[-4] == "=========="
    assert lines[-3].startswith("Prompt: 4 tokens, ") and lines[-3].endswith(" tokens-per-sec")
    assert lines[-2].startswith("Generation: 8 tokens, ")
    assert lines[-1].startswith("Peak memory: ") and lines[-1].endswith(" GB")
    # --no-cache and --halt-max-steps give the same greedy text as the cached path
    cached = run_cli(capsys, ["--model", str(model_dir), "--max-tokens", "6",
                              "--halt-max-steps", "3", "--ignore-eos"]).out
    uncached = run_cli(capsys, ["--model", str(model_dir), "--max-tokens", "6",
                                "--halt-max-steps", "3", "--ignore-eos", "--no-cache"]).out
    assert cached.splitlines()[1] == uncached.splitlines()[1]


def test_cli_batch_mode_writes_json_lines(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe dog ran very fast to\nShe was happy\n")
    out_file = tmp_path / "out" / "stories.jsonl"
    out = run_cli(capsys, ["--model", str(model_dir), "--prompts-file", str(prompts),
                           "--output", str(out_file), "--max-tokens", "5", "--batch-size", "2",
                           "--l-cycles", "3"]).out
    assert "Generation: " in out and "Peak memory: " in out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert rows[1]["prompt"] == "The dog ran very fast to"
    assert {"completion", "generation_tokens", "finish_reason", "temperature"} <= set(rows[0])
    assert rows[0]["L_cycles"] == 3 and rows[0]["halt_max_steps"] == 2
    # without --output the JSON lines go to stdout and the statistics to stderr
    captured = run_cli(capsys, ["--model", str(model_dir), "--prompts-file", str(prompts),
                                "--max-tokens", "3"])
    assert len(captured.out.splitlines()) == 3 and "Generation: " in captured.err


def test_cli_default_max_tokens_fill_the_trained_length_without_a_warning(model_dir, capsys):
    """No --max-tokens: what seq_len (48) leaves after the prompt, so no extrapolation warning;
    an explicit --max-tokens past it keeps the one warning."""
    prompt_tokens = len(load(model_dir)[1].encode("Once upon a time"))
    captured = run_cli(capsys, ["--model", str(model_dir), "--ignore-eos",
                                "--prompt", "Once upon a time"])
    assert f"Generation: {48 - prompt_tokens} tokens, " in captured.out
    assert "warning" not in captured.err
    captured = run_cli(capsys, ["--model", str(model_dir), "--ignore-eos", "--max-tokens", "50",
                                "--prompt", "Once upon a time"])
    assert "Generation: 50 tokens, " in captured.out
    assert [line for line in captured.err.splitlines() if "warning" in line] == [
        f"warning: prompt ({prompt_tokens}) + max tokens (50) go past the trained length 48; "
        "later positions are extrapolated"]


def test_a_story_from_nothing_starts_from_end_of_story(model_dir, capsys):
    """No prompt (the CLI without --prompt, the Python API with ""): end-of-story is the whole
    context, greedy and sampled, and the text is what generate_step gives from [eos]."""
    model, tok = load(model_dir)
    assert encode_prompt(tok, "") == encode_prompt(tok, []) == [tok.eos_id] == [0]
    greedy = [t for t, _ in generate_step([0], model, max_tokens=6)]
    text = decode_continuation(tok, [0], greedy)
    assert generate(model, tok, "", max_tokens=6, ignore_eos=True) == text
    out = run_cli(capsys, ["--model", str(model_dir), "--max-tokens", "6", "--ignore-eos"]).out
    assert out.splitlines()[1] == text and "Prompt: 1 tokens, " in out
    sampler = make_sampler(1.0)
    mx.random.seed(3)
    sampled = [r.token for r in stream_generate(model, tok, "", 6, sampler=sampler,
                                                ignore_eos=True)]
    mx.random.seed(3)
    assert sampled == [t for t, _ in generate_step([0], model, max_tokens=6, sampler=sampler)]
    assert sampled != greedy
    result = batch_generate(model, tok, ["", "Once"], 6, ignore_eos=True)
    assert result.tokens[0] == greedy


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "word " * 60], "at most 48"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--temp", "-1"], "temperature"),
])
def test_cli_errors_are_one_line_with_exit_code_2(model_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        gen.main(["--model", str(model_dir), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_missing_model(tmp_path, capsys, monkeypatch):
    import mlx_trm.cli.loading

    monkeypatch.setattr(mlx_trm.cli.loading, "DEMO_MODEL", tmp_path / "no-demo")  # where it is read
    for argv in (["--model", str(tmp_path / "nope")], []):
        with pytest.raises(SystemExit) as exit_info:
            gen.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--model" in err[0]


def test_sweep_script_writes_tokens_per_second(model_dir, tmp_path):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("sweep", ROOT / "scripts" / "sweep_generation.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep.json"
    sweep.main(["--model", str(model_dir), "--max-tokens", "2", "--halt-max-steps", "1", "8",
                "--output", str(out)])
    result = json.loads(out.read_text())
    settings = [(g["temperature"], g["top_k"], g["halt_max_steps"], g["seed"])
                for g in result["generations"]]
    assert settings[:2] == [(0.0, 0, 1, 42), (0.3, 10, 1, 43)] and len(settings) == 8
    assert settings[4] == (0.0, 0, 8, 46)
    assert all(g["tokens_per_sec"] > 0 and len(g["stories"]) == 10 for g in result["generations"])


def test_cli_repetition_penalty_changes_the_story_and_is_checked(model_dir, capsys):
    base = ["--model", str(model_dir), "--prompt", "Once upon a time", "--max-tokens", "24",
            "--ignore-eos"]
    plain = run_cli(capsys, base).out.split("==========")[1]
    penalised = run_cli(capsys, base + ["--repetition-penalty", "5",
                                        "--repetition-context-size", "64"]).out
    assert penalised.split("==========")[1] != plain
    with pytest.raises(SystemExit):
        gen.main(base + ["--repetition-penalty", "-1"])
    assert "--repetition-penalty" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# mlx-lm's conventions for model classes


@pytest.mark.parametrize("kind", ["dense_act", "moeut_act", "flat"])
def test_a_float16_model_computes_in_float16(kind):
    """Logits take the parameters' dtype (as mlx-lm's models), through the cache too, and stay
    close to the float32 model's."""
    model = small_model(kind)
    full32 = full_logits(model, PROMPT)
    model.set_dtype(mx.float16)
    assert model(mx.array([PROMPT])).dtype == mx.float16
    if kind.startswith("moeut") and mx.default_device() == mx.cpu:
        return  # the CPU's gather_mm (the experts) takes float32 only: nothing to run here
    decode = CachedDecoder(model, [PROMPT[:3]], 8)
    assert decode.prefill().dtype == mx.float16 and decode(mx.array([4])).dtype == mx.float16
    assert np.abs(full_logits(model, PROMPT).astype(np.float32) - full32).max() < 0.05


def test_a_model_deep_copies_after_it_decoded_and_is_freed_when_dropped():
    import copy
    import gc
    import weakref

    model = small_model("dense_act")
    before = greedy_ids(model, PROMPT, 6)
    twin = copy.deepcopy(model)  # the copy starts without the original's compiled functions
    twin.update(tree_map(lambda p: p * 0, twin.parameters()))
    assert greedy_ids(model, PROMPT, 6) == before  # the original still reads its own weights
    twin = copy.deepcopy(model)
    assert greedy_ids(twin, PROMPT, 6) == before
    # a compiled function holds the weights it reads: kept anywhere but on the model, it would
    # keep every model that ever decoded alive (a comparison trains and samples several)
    alive = weakref.ref(model)
    del model, twin
    gc.collect()
    assert alive() is None
