"""What the shared command-line arguments ask for (arguments.py): the model and tokenizer, mlx-lm's
logits processors, speculative decoding, the adaptive halting policy. Imported by the commands
after parsing, since it brings in mlx, mlx-lm and the model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.sample_utils import make_logits_processors

from ..blas import prepare_cpu_backend
from ..checkpoint import load
from ..config import ConfigError
from ..data.tokenizer import load_tokenizer
from ..generation.adaptive import HaltPolicy, halt_policy
from ..generation.speculative import Speculation, speculation
from .arguments import DEFAULT_DRAFT_TOKENS, DEFAULT_THRESHOLDS

DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "model"


def resolve_model_path(path: str | None) -> Path:
    if path is not None:
        return Path(path)
    if (DEMO_MODEL / "config.json").is_file():
        return DEMO_MODEL
    raise ConfigError("no --model given and no packaged demo model is installed; pass --model DIR "
                      "(a directory written by mlx_trm.train, mlx_trm.save or mlx_trm.convert)")


def load_for_decoding(args: argparse.Namespace) -> tuple[nn.Module, Any, dict, list[Any]]:
    """``generate`` and ``chat``: the model and tokenizer, the decoding options the flags ask for
    (``halt_policy``, ``speculation``) and mlx-lm's logits processors, on a prepared CPU backend
    and with the sampling seed set."""
    prepare_cpu_backend()
    model, tokenizer = load_for_generation(args)
    decoding = dict(halt_policy=policy_from_args(model, args),
                    speculation=speculation_from_args(model, tokenizer, args))
    processors = logits_processors_from_args(args)
    if args.seed is not None:
        mx.random.seed(args.seed)
    return model, tokenizer, decoding, processors


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


def logits_processors_from_args(args: argparse.Namespace) -> list[Any]:
    """mlx-lm's logits processors for --repetition-penalty (none when it is off)."""
    if args.repetition_penalty is not None and args.repetition_penalty < 0:
        raise ConfigError(f"--repetition-penalty must be >= 0 (got {args.repetition_penalty})")
    if args.repetition_context_size < 1:
        raise ConfigError("--repetition-context-size must be >= 1 "
                          f"(got {args.repetition_context_size})")
    return make_logits_processors(repetition_penalty=args.repetition_penalty,
                                  repetition_context_size=args.repetition_context_size)


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


def policy_from_args(model: Any, args: Any) -> HaltPolicy | None:
    """The policy the --adaptive-halt flags ask for (None without them)."""
    if args.adaptive_halt is None:
        if args.halt_threshold is not None or args.min_halt_steps != 1:
            raise ConfigError("--halt-threshold and --min-halt-steps only apply with "
                              "--adaptive-halt {kl,latent,q}; add it or drop them")
        return None
    threshold = args.halt_threshold
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS.get(args.adaptive_halt, 0.0)
    return halt_policy(model, args.adaptive_halt, threshold, args.min_halt_steps)
