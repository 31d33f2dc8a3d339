"""The command-line arguments that ``mlx_trm.generate``, ``mlx_trm.chat`` and
``mlx_trm.evaluate`` share, and prompt files. Only argparse and the standard library: a command's
``--help`` imports nothing more (what the arguments ask for is built in loading.py, after
parsing)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ConfigError

DEFAULT_DRAFT_TOKENS = 3
# --halt-threshold when none is given: measured on the dense TRM + ACT 1M model's sweep
# (benchmarks/results/adaptive_recursion.md); q's 0 is the model's own rule
DEFAULT_THRESHOLDS = {"kl": 0.0, "latent": 0.0, "q": 0.0}


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line), a .jsonl file ({"prompt": ...} or a string per
    line) or a .json list."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            items = json.loads(text)
        elif path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = [line for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    prompts = [item["prompt"] if isinstance(item, dict) and "prompt" in item else item
               for item in (items if isinstance(items, list) else [])]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{path} holds no prompts: write one per line, or JSON lines with a "
                          "'prompt' field")
    return prompts


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--model (the packaged demo model by default, unless ``required``), --tokenizer and the
    test-time depth overrides that :func:`load_for_generation` reads."""
    parser.add_argument("--model", default=None, required=required,
                        help="model directory" + ("" if required else " (default: the demo model)"))
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer if the model directory has none (default: packaged)")
    parser.add_argument("--halt-max-steps", type=int, default=None,
                        help="test-time ACT refinement steps (default: the model's)")
    parser.add_argument("--l-cycles", type=int, default=None,
                        help="test-time L_cycles (default: the model's)")


def add_sampling_arguments(parser: argparse.ArgumentParser, temp: float = 0.0,
                           top_k: int = 0) -> None:
    parser.add_argument("--temp", type=float, default=temp, help="temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=top_k, help="keep the k most likely (0: off)")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus mass (0 or 1: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="min-p filter (0: off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="mlx-lm's: divide positive (multiply negative) logits of recent "
                             "tokens by this (1 or 0: off)")
    parser.add_argument("--repetition-context-size", type=int, default=20,
                        help="tokens of prompt + reply the repetition penalty looks back over")


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft-steps", type=int, default=None,
                        help="speculative recursion: draft with the model's first N ACT steps, "
                             "verify with the rest (same output, fewer passes; default: off)")
    parser.add_argument("--draft-model", default=None,
                        help="speculative decoding with a separate, smaller draft model "
                             "directory (same tokenizer)")
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help=f"tokens drafted per round (default {DEFAULT_DRAFT_TOKENS})")


def add_adaptive_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adaptive-halt", default=None, metavar="{kl,latent,q}",
                        help="halt each token's ACT steps on its own: kl (next-token "
                        "distributions stop changing), latent (z_H stops changing) or q (the "
                        "model's q-halt head); default: every token runs --halt-max-steps")
    parser.add_argument("--halt-threshold", type=float, default=None,
                        help="halt when the criterion is below this (kl, latent: 0 = never; "
                        "q: q_continue - q_halt, 0 = the model's rule)")
    parser.add_argument("--min-halt-steps", type=int, default=1,
                        help="ACT steps every token runs before it may halt (default 1)")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """How generate and chat decode: compiled or not, per-token halting, speculative recursion."""
    parser.add_argument("--no-compile", action="store_true", help="run the decode step eagerly")
    add_adaptive_arguments(parser)
    add_speculative_arguments(parser)
