"""The demo model shipped in the package: generate and chat run with no --model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import mlx.core as mx

from mlx_trm.cli.loading import DEMO_MODEL
from mlx_trm.generation.sampling import make_sampler

# words any TinyStories-like English story is full of
COMMON = {"the", "a", "was", "and", "to", "he", "she", "they", "her", "his", "it", "day",
          "little", "in", "with", "said", "of", "had", "there", "saw", "very", "big", "happy"}


def run(module: str, *args: str, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    # from another directory, as after `pip install`: nothing may come from the checkout's cwd
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, text=True,
                          capture_output=True, timeout=120, cwd=cwd, env=os.environ.copy())


def looks_english(text: str) -> bool:
    words = re.findall(r"[A-Za-z']+", text)
    return len(words) >= 15 and sum(w.lower() in COMMON for w in words) >= 0.25 * len(words)


def test_demo_model_ships_small_float16_and_documented():
    assert (DEMO_MODEL / "config.json").is_file(), "the demo model belongs in mlx_trm/assets/model"
    weights = mx.load(str(DEMO_MODEL / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float16}
    assert (DEMO_MODEL / "model.safetensors").stat().st_size < 3_000_000
    provenance = json.loads((DEMO_MODEL / "provenance.json").read_text())
    assert provenance["last_evaluation"]["val_token_ce"] < 0.75 * 5.8473  # unigram baseline
    assert not (DEMO_MODEL / "train_state").exists()  # no optimizer state in the wheel


def test_generate_with_no_model_tells_an_english_story(tmp_path):
    result = run("mlx_trm.cli.generate", "--prompt", "Once upon a time", "--max-tokens", "40",
                 "--temp", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1].startswith("Once upon a time")
    story = "\n".join(lines[1:-4])
    assert looks_english(story), story
    assert lines[-3].startswith("Prompt: 4 tokens, ")
    assert re.match(r"Generation: \d+ tokens, [\d.]+ tokens-per-sec", lines[-2])
    assert lines[-1].startswith("Peak memory: ")


def test_chat_with_no_model_continues_the_story(tmp_path):
    result = run("mlx_trm.cli.chat", "--max-tokens", "30", "--temp", "0",
                 stdin="Once upon a time, there was a little dog.\n/quit\n", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert looks_english(result.stdout), result.stdout


def test_demo_model_writes_a_story_from_nothing(tmp_path):
    """No prompt: the CLI, chat's empty first line and the Python API start from end-of-story,
    the context the demo's packed rows put before every story, and write a story."""
    result = run("mlx_trm.cli.generate", "--max-tokens", "60", "--temp", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-3].startswith("Prompt: 1 tokens, ")
    story = "\n".join(lines[1:-4])
    assert looks_english(story) and story.startswith("Once upon a time"), story
    from mlx_trm import generate, load

    model, tokenizer = load(DEMO_MODEL)
    assert generate(model, tokenizer, "", max_tokens=60) == story
    mx.random.seed(0)
    sampled = generate(model, tokenizer, "", max_tokens=60, sampler=make_sampler(0.8, top_k=40))
    assert looks_english(sampled) and sampled != story, sampled
    chat = run("mlx_trm.cli.chat", "--max-tokens", "60", "--temp", "0", stdin="\n/quit\n",
               cwd=tmp_path)
    assert chat.returncode == 0 and chat.stdout.strip() == story, chat.stderr
