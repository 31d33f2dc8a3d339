"""Command-line pieces that ``mlx_trm.generate``, ``mlx_trm.chat`` and ``mlx_trm.evaluate`` share:
the model/tokenizer arguments and loading, the sampling and speculative-decoding arguments,
prompt files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm.sample_utils import make_logits_processors

from .checkpoint import load
from .config import ConfigError
from .generation.speculative import Speculation, speculation
from .tokenizer import load_tokenizer

DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "model"


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


# ----------------------------------------------------------------------------------------------
# Command line


def resolve_model_path(path: str | None) -> Path:
    if path is not None:
        return Path(path)
    if (DEMO_MODEL / "config.json").is_file():
        return DEMO_MODEL
    raise ConfigError("no --model given and no packaged demo model is installed; pass --model DIR "
                      "(a directory written by mlx_trm.train, mlx_trm.save or mlx_trm.convert)")


def load_for_generation(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """Model and tokenizer from the shared --model/--tokenizer/--halt-max-steps/--l-cycles."""
    overrides = {k: v for k, v in (("halt_max_steps", args.halt_max_steps),
                                   ("L_cycles", args.l_cycles)) if v is not None}
    model, tokenizer = load(resolve_model_path(args.model), model_config=overrides)
    if args.tokenizer is not None or tokenizer is None:
        tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{model.args.vocab_size}; pass the model's tokenizer with --tokenizer")
    return model, tokenizer


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


def logits_processors_from_args(args: argparse.Namespace) -> list[Any]:
    """mlx-lm's logits processors for --repetition-penalty (none when it is off)."""
    if args.repetition_penalty is not None and args.repetition_penalty < 0:
        raise ConfigError(f"--repetition-penalty must be >= 0 (got {args.repetition_penalty})")
    if args.repetition_context_size < 1:
        raise ConfigError("--repetition-context-size must be >= 1 "
                          f"(got {args.repetition_context_size})")
    return make_logits_processors(repetition_penalty=args.repetition_penalty,
                                  repetition_context_size=args.repetition_context_size)



DEFAULT_DRAFT_TOKENS = 3


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft-steps", type=int, default=None,
                        help="speculative recursion: draft with the model's first N ACT steps, "
                             "verify with the rest (same output, fewer passes; default: off)")
    parser.add_argument("--draft-model", default=None,
                        help="speculative decoding with a separate, smaller draft model "
                             "directory (same tokenizer)")
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help=f"tokens drafted per round (default {DEFAULT_DRAFT_TOKENS})")


def speculation_from_args(model: nn.Module, tokenizer: Any,
                          args: argparse.Namespace) -> Speculation | None:
    """What --draft-steps / --draft-model / --num-draft-tokens ask for (None without them)."""
    if args.draft_steps is None and args.draft_model is None:
        if args.num_draft_tokens is not None:
            raise ConfigError("--num-draft-tokens only applies with --draft-steps N or "
                              "--draft-model DIR; add one or drop it")
        return None
    draft = None
    if args.draft_model is not None:
        draft, draft_tokenizer = load(resolve_model_path(args.draft_model))
        probe = "Once upon a time, Lily said: \"Look!\" 123"
        if draft_tokenizer is not None and (
                draft_tokenizer.vocab_size != tokenizer.vocab_size
                or draft_tokenizer.encode(probe) != tokenizer.encode(probe)):
            raise ConfigError(f"the draft model {args.draft_model} has another tokenizer than "
                              "the model; speculative decoding needs the same one")
    k = DEFAULT_DRAFT_TOKENS if args.num_draft_tokens is None else args.num_draft_tokens
    return speculation(model, k, args.draft_steps, draft)
