"""mlx_lm.server on the demo model, through the official openai client: every request kind is
answered (a completion or a 4xx with a one-line reason), the server keeps its greedy texts, an
empty prompt starts a story from nothing, and a small load (benchmarks/serve_load.py) passes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from mlx_trm import generate, load
from mlx_trm.cli.loading import DEMO_MODEL

pytest.importorskip("openai")  # the [serve] extra
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve_load  # noqa: E402
from serve_concurrency import free_port, start_server, stop_server  # noqa: E402

SEQ_LEN = json.loads((DEMO_MODEL / "config.json").read_text())["seq_len"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One mlx_lm.server (the README's command) on 127.0.0.1 for the module."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    process = start_server(str(DEMO_MODEL), port, str(log), env=env)
    yield f"http://127.0.0.1:{port}", process.pid
    stop_server(process)


def test_the_tokenizer_mlx_lm_builds_starts_an_empty_text_from_end_of_story():
    """With --trust-remote-code (as mlx-lm passes it) AutoTokenizer builds StoryTokenizer: the
    same ids as ours, except that a text or chat with nothing in it is [end-of-story]."""
    from transformers import AutoTokenizer

    _, ours = load(DEMO_MODEL)
    hf = AutoTokenizer.from_pretrained(DEMO_MODEL, trust_remote_code=True)
    assert type(hf).__name__ == "StoryTokenizer"
    text = "Once upon a time, there was a little girl named Lily."
    assert hf.encode(text) == ours.encode(text) and hf.encode("  ") == ours.encode("  ")
    assert hf.encode("") == [ours.eos_id] == [0]
    chat = [{"role": "user", "content": ""}]
    assert hf.apply_chat_template(chat, tokenize=True, return_dict=False) == [0]
    assert AutoTokenizer.from_pretrained(DEMO_MODEL).encode("") == []  # untrusted: the plain one


def test_every_request_is_answered_and_greedy_texts_stay(server):
    base, _ = server
    rows = {outcome.kind: (outcome, same) for outcome, same in
            serve_load.probe(base, SEQ_LEN, max_tokens=12)}
    assert rows.keys() == serve_load.SENDS.keys()
    for kind, (outcome, same) in rows.items():
        assert same, f"after {kind} the greedy text changed"
        if kind in serve_load.INVALID:  # a 4xx with a one-line reason
            assert 400 <= outcome.status < 500 and outcome.text and "\n" not in outcome.text
        else:
            assert outcome.status == (0 if kind == "hang up" else 200) and outcome.text, kind
    assert rows["max_tokens 0"][0].text == "max_tokens must be at least 1"
    assert rows["temperature -1"][0].text == "temperature must be at least 0"
    assert rows["malformed JSON"][0].text.startswith("Invalid JSON in request body")
    assert "empty conversation" in rows["no messages"][0].text
    # a story from nothing: the server's text is mlx_trm.generate's from end-of-story (mlx-lm
    # drops the first word's space; here there is none), and an empty message gives the same
    model, tokenizer = load(DEMO_MODEL)
    story = generate(model, tokenizer, "", max_tokens=12)
    assert story.startswith("Once upon a time")
    assert rows["empty prompt"][0].text == rows["empty message"][0].text == story


def test_small_load_with_the_openai_client(server):
    base, pid = server
    summary = serve_load.load(base, pid, clients=4, requests=3, max_tokens=8, seq_len=SEQ_LEN)
    checks = {**summary["sequential_checks"], **summary["checks"]}
    assert checks["greedy_sequential_text"][1] > 4 and checks["invalid_4xx"][1] > 0
    assert all(passed == total for passed, total in checks.values()), checks
    assert summary["requests"] == 12 and summary["rss_mb_end"] > 0
