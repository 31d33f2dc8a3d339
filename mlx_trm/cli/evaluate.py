"""Held-out loss of a model directory: ``mlx_trm.evaluate --model DIR --data PATH``.

Prints token cross-entropy (nats), perplexity and bits per byte, as
``mlx_trm.training.evaluation`` computes them (with ``--adaptive-halt``, under generation's
per-token halting).
"""

from __future__ import annotations

import argparse
import sys

from ..config import cli_errors
from .arguments import add_adaptive_arguments, add_model_arguments


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``mlx_trm.evaluate`` (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(prog="mlx_trm.evaluate",
                                     description="Held-out cross-entropy of a model directory.")
    add_model_arguments(parser, required=True)
    parser.add_argument("--data", required=True, help="stories: a file, directory or hub id")
    parser.add_argument("--split", default="validation", help="split of --data (default valid)")
    parser.add_argument("--max-stories", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the model's")
    add_adaptive_arguments(parser)
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # mlx, mlx-lm and the model only now: --help answers at once
    from ..blas import prepare_cpu_backend
    from ..training.evaluation import (
        COLLAPSE_NOTE,
        COLLAPSED_SPREAD,
        evaluate_adaptive,
        evaluate_model,
    )
    from .loading import load_for_generation, policy_from_args

    prepare_cpu_backend()
    model, tokenizer = load_for_generation(args)
    policy = policy_from_args(model, args)
    if policy is not None:  # the same per-token halting as generation, teacher-forced
        return _print_adaptive(evaluate_adaptive(
            model, tokenizer, args.data, policy, split=args.split, batch_size=args.batch_size,
            seq_len=args.seq_len, max_stories=args.max_stories))
    result = evaluate_model(model, tokenizer, args.data, split=args.split,
                            batch_size=args.batch_size, seq_len=args.seq_len,
                            max_stories=args.max_stories, progress=sys.stderr.isatty())
    print(f"stories: {result['stories']}, predicted tokens: {result['tokens']}")
    print(f"token cross-entropy: {result['token_ce']:.4f} nats")
    print(f"perplexity: {result['perplexity']:.2f}")
    print(f"bits per byte: {result['bits_per_byte']:.4f}")
    print(f"accuracy: {result['accuracy']:.4f}")
    print(f"latent spread: {result['latent_spread']:.3g}")
    if result["latent_spread"] < COLLAPSED_SPREAD:
        print(COLLAPSE_NOTE)


def _print_adaptive(result: dict) -> None:
    print(f"stories: {result['stories']}, predicted tokens: {result['tokens']}")
    print(f"token cross-entropy: {result['token_ce']:.4f} nats")
    print(f"perplexity: {result['perplexity']:.2f}")
    print(f"accuracy: {result['accuracy']:.4f}")
    print(f"ACT steps per token: {result['act_steps_per_token']:.2f}")


if __name__ == "__main__":
    main()
