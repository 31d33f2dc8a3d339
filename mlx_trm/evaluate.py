"""Held-out loss of a model directory: ``mlx_trm.evaluate --model DIR --data PATH``.

Prints token cross-entropy (nats), perplexity and bits per byte. The model runs as at inference
(fresh carry, ``halt_max_steps`` ACT steps); each story is one row as in training (end-of-story
and padding masked), so the first token of each story is context, never a target. Bits per byte
divide the summed cross-entropy (in bits) by the UTF-8 bytes of the predicted tokens' text.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import numpy as np

from .adaptive import add_adaptive_arguments, evaluate_adaptive, policy_from_args
from .blas import warn_if_slow_blas
from .config import ConfigError, cli_errors


def predicted_bytes(tokenizer: Any, labels: np.ndarray) -> int:
    """UTF-8 bytes of the text behind the label tokens of a batch (masked ones excluded)."""
    total = 0
    for row in labels:
        ids = row[row >= 0].tolist()
        total += len(tokenizer.decode(ids).encode("utf-8"))
    return total


# Below this latent spread every position reads out nearly the same z_H (healthy models: > 0.1).
COLLAPSED_SPREAD = 1e-3
COLLAPSE_NOTE = ("note: the latents have collapsed: every position reads out nearly the same "
                 "z_H, so the model predicts one distribution everywhere (the unigram plateau). "
                 "TRMs without ACT often pass through this early and recover; ACT runs on small "
                 "budgets stay there unless they start with train.act_warmup_percent=0.5 "
                 "(benchmarks/results/README.md)")


def evaluate_model(model: Any, tokenizer: Any, data: str, *, split: str = "validation",
                   batch_size: int = 16, seq_len: int | None = None,
                   max_stories: int | None = None, text_field: str = "text",
                   progress: bool = True) -> dict[str, float]:
    from rich.progress import Progress

    from .data import iterate_batches, load_tokens, num_batches
    from .sources import resolve_source
    from .train import evaluate_batches, make_eval_fn

    seq_len = seq_len or model.args.seq_len
    try:
        source = resolve_source(data, split)
    except ConfigError:
        source = resolve_source(data, "train")  # a single file given as is: evaluate it
    dataset = load_tokens(source, tokenizer, text_field=text_field, max_stories=max_stories)
    n_bytes = 0
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("evaluate", total=num_batches(dataset, batch_size, seq_len))

        def batches():  # counts the predicted bytes and advances the bar on the way
            nonlocal n_bytes
            # a fixed order (epoch 1 of seed 42) so repeated runs see the same batches
            for inputs, labels in iterate_batches(dataset, batch_size, seq_len):
                n_bytes += predicted_bytes(tokenizer, labels)
                yield inputs, labels
                bar.advance(task)

        result = evaluate_batches(make_eval_fn(model), batches())
    ce_sum = result["token_ce"] * result["tokens"]
    return {
        "stories": dataset.n_stories,
        "tokens": result["tokens"],
        "token_ce": result["token_ce"],
        "perplexity": result["perplexity"],
        "bits_per_byte": ce_sum / math.log(2) / max(n_bytes, 1),
        "accuracy": result["accuracy"],
        "latent_spread": result["latent_spread"],
    }


@cli_errors
def main(argv: list[str] | None = None) -> None:
    from .checkpoint import load
    from .tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="mlx_trm.evaluate",
                                     description="Held-out cross-entropy of a model directory.")
    parser.add_argument("--model", required=True, help="model directory (or run directory)")
    parser.add_argument("--data", required=True, help="stories: a file, directory or hub id")
    parser.add_argument("--split", default="validation", help="split of --data (default valid)")
    parser.add_argument("--max-stories", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the model's")
    parser.add_argument("--tokenizer", default=None, help="if the model dir has none")
    parser.add_argument("--halt-max-steps", type=int, default=None,
                        help="test-time ACT steps (default: the model's)")
    parser.add_argument("--l-cycles", type=int, default=None, help="test-time L_cycles")
    add_adaptive_arguments(parser)
    args = parser.parse_args(argv)
    warn_if_slow_blas()
    overrides = {k: v for k, v in (("halt_max_steps", args.halt_max_steps),
                                   ("L_cycles", args.l_cycles)) if v is not None}
    model, tokenizer = load(args.model, model_config=overrides)
    if args.tokenizer is not None or tokenizer is None:
        tokenizer = load_tokenizer(args.tokenizer)
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
