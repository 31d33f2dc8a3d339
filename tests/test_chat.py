"""mlx_trm.chat driven through standard input: a scripted conversation."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from mlx_trm.checkpoint import load
from mlx_trm.cli import chat
from mlx_trm.generation import session as session_mod
from tests.conftest import ROOT, save_small_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp("chat") / "model", seq_len=40)


def converse(monkeypatch, capsys, model_dir, script: str, *args: str) -> list[str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    chat.main(["--model", str(model_dir), "--seed", "0", *args])
    return capsys.readouterr().out.splitlines()


def test_scripted_conversation(monkeypatch, capsys, model_dir):
    script = "\n".join([
        "Once upon a time",
        "/max-tokens 5",
        "/temp 0",
        "/stats",
        "The dog was happy.",
        "",  # empty line: the model goes on by itself
        "/temp hot",
        "/max-tokens 40",
        "/frobnicate",
        "/reset",
        "/help",
        "/quit",
        "never read",
    ]) + "\n"
    out = converse(monkeypatch, capsys, model_dir, script, "--max-tokens", "3", "--temp", "0")
    _, tokenizer = load(model_dir)
    n1, n2 = (len(tokenizer.encode(t)) for t in ("Once upon a time", "The dog was happy."))
    assert out[1:4] == ["[max tokens 5]", "[temperature 0.0]", "[statistics on]"]
    # /stats prints the last reply's block at once; each later reply prints its own
    blocks = [i for i, line in enumerate(out) if line == "=========="]
    assert len(blocks) == 3 and blocks[0] == 4
    assert out[5].startswith(f"Prompt: {n1} tokens,")
    assert out[6].startswith("Generation: 3 tokens,")
    # the story so far is the prompt of each reply
    assert out[blocks[1] + 1].startswith(f"Prompt: {n1 + 3 + n2} tokens,")
    assert out[blocks[1] + 2].startswith("Generation: 5 tokens,")
    assert out[blocks[2] + 1].startswith(f"Prompt: {n1 + 3 + n2 + 5} tokens,")
    rest = out[blocks[2] + 4:]
    assert rest[0] == "error: /temp needs a number, got 'hot'"
    assert rest[1].startswith("error: max tokens must be in [1, 39]")
    assert rest[2] == "unknown command /frobnicate; /help lists the commands"
    assert rest[3] == "[new story]" and rest[4] == chat.HELP.splitlines()[0]
    assert not any("never read" in line for line in out)


def test_story_session_slides_and_greedy_replies_continue_the_text(model_dir):
    model, tokenizer = load(model_dir)
    session = session_mod.StorySession(model, tokenizer, max_tokens=8, temp=0.0)
    first = [r.token for r in session.reply("Once upon a time") if r.finish_reason != "stop"]
    prompt = tokenizer.encode("Once upon a time")
    assert session.context == prompt + first
    # the same greedy continuation as generate_step on the same ids
    from mlx_trm.generation.generate import generate_step

    assert first == [t for t, _ in generate_step(prompt, model, max_tokens=8)][:len(first)]
    for _ in range(6):  # seq_len 40: the window keeps the last 32 tokens before each reply
        list(session.reply("and then"))
    assert len(session.context) <= 40 and session.dropped > 0
    session.reset()
    assert session.context == [] and session.dropped == 0
    # an empty first line: a story from nothing, end-of-story as its only context
    first = [r.token for r in session.reply("") if r.finish_reason != "stop"]
    assert session.context == [tokenizer.eos_id] + first
    assert first == [t for t, _ in generate_step([0], model, max_tokens=8)][:len(first)]


def test_default_max_tokens_fit_the_model(monkeypatch, capsys, model_dir):
    """No --max-tokens: 200 per reply would not fit seq_len 40, so half of it is asked."""
    asked = []

    class Spy(session_mod.StorySession):
        def set_max_tokens(self, n: int) -> None:
            asked.append(n)
            super().set_max_tokens(n)

    monkeypatch.setattr(session_mod, "StorySession", Spy)  # chat.main reads it there
    out = converse(monkeypatch, capsys, model_dir, "Once upon a time\n/quit\n")
    assert asked == [20] and not any("error" in line for line in out)


def test_chat_runs_from_a_pipe(model_dir):
    """python -m mlx_trm.cli.chat with standard input from a pipe (not a terminal)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_trm.cli.chat", "--model", str(model_dir), "--max-tokens", "4",
         "--temp", "0", "--stats"],
        input="Once upon a time\n/quit\n", capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-4] == "==========" and lines[-2].startswith("Generation: 4 tokens,")
    assert ">>" not in proc.stdout  # no prompt marker when not interactive
