"""``mlx_trm.generate``: continue a story, or a file of prompts, mlx-lm style.

    mlx_trm.generate --model DIR --prompt "Once upon a time" --max-tokens 200 --temp 0.8 --top-k 40
    mlx_trm.generate --model DIR --prompts-file prompts.txt --output stories.jsonl

Generation itself is ``mlx_trm.generation`` (``mlx_trm.generate`` in Python is its
:func:`~mlx_trm.generation.generate.generate`). Prompts longer than the model's ``seq_len`` are
refused; prompt + new tokens past it get a warning (those positions were never trained).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, cli_errors
from .arguments import (
    add_decoding_arguments,
    add_model_arguments,
    add_sampling_arguments,
    read_prompts,
)


def _batch_main(args: argparse.Namespace, model: Any, tokenizer: Any, sampler: Any,
                decoding: dict, processors: list[Any]) -> None:
    from ..generation.generate import batch_generate, check_length, encode_prompt, fit_max_tokens
    from ..generation.stats import decoding_lines, print_stats

    prompts = read_prompts(args.prompts_file)
    longest = max(len(encode_prompt(tokenizer, p)) for p in prompts)
    args.max_tokens = fit_max_tokens(model, longest, args.max_tokens)
    warning = check_length(model, longest, args.max_tokens)
    if warning:
        print(warning, file=sys.stderr)
    result = batch_generate(model, tokenizer, prompts, args.max_tokens, batch_size=args.batch_size,
                            ignore_eos=args.ignore_eos, sampler=sampler,
                            use_cache=not args.no_cache, compile=not args.no_compile,
                            logits_processors=processors, **decoding)
    settings = {"temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p,
                "min_p": args.min_p, "seed": args.seed,
                "repetition_penalty": args.repetition_penalty,
                "halt_max_steps": model.args.halt_max_steps, "L_cycles": model.args.L_cycles}
    lines = [json.dumps({"id": i, "prompt": p, "completion": text.rstrip(),
                         "generation_tokens": len(ids), "finish_reason": reason, **settings})
             for i, (p, text, ids, reason) in enumerate(
                 zip(prompts, result.texts, result.tokens, result.finish_reasons))]
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"wrote {len(lines)} stories to {out}")
        print_stats(result.stats)
        for line in decoding_lines(**decoding):
            print(line)
    else:  # JSON lines on stdout, statistics on stderr
        for line in lines:
            print(line)
        print_stats(result.stats, file=sys.stderr)
        for line in decoding_lines(**decoding):
            print(line, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``mlx_trm.generate`` (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(
        prog="mlx_trm.generate",
        description="Continue a story with a (recursive) TRM model, mlx-lm style.")
    add_model_arguments(parser)
    parser.add_argument("--prompt", default="",
                        help="text to continue (default: none, a story from nothing)")
    parser.add_argument("--max-tokens", "-m", type=int, default=None,
                        help="new tokens at most (stops earlier at end-of-story; default: what "
                             "the model's seq_len leaves after the prompt)")
    add_sampling_arguments(parser)
    parser.add_argument("--no-cache", action="store_true",
                        help="re-run the whole sequence per token, as the reference (slow)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="do not stop at end-of-story (benchmarking)")
    parser.add_argument("--prompts-file", default=None,
                        help="batch mode: prompts, one per line (or .jsonl with 'prompt')")
    parser.add_argument("--output", default=None,
                        help="batch mode: write JSON lines here (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch mode: prompts at once")
    parser.add_argument("--verbose", action="store_true",
                        help="print the model, its cache slots and the BLAS first")
    add_decoding_arguments(parser)
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_tokens is not None and (args.max_tokens == 0 or args.max_tokens < -1):
        raise ConfigError("--max-tokens must be positive (or -1 for no limit)")
    # mlx, mlx-lm and the model only now: --help and bad arguments answer at once
    from ..blas import loaded_blas
    from ..generation.generate import check_length, encode_prompt, fit_max_tokens, stream_generate
    from ..generation.sampling import make_sampler
    from ..generation.stats import decoding_lines, print_stats
    from .loading import load_for_decoding

    model, tokenizer, decoding, processors = load_for_decoding(args)
    sampler = make_sampler(args.temp, args.top_p, args.min_p, args.top_k)
    if args.verbose:
        a = model.args
        print(f"model: {a.name} ({a.kind}), halt_max_steps={a.halt_max_steps}, "
              f"H_cycles={a.H_cycles}, L_cycles={a.L_cycles}, L_layers={a.L_layers}, "
              f"cache slots: {model.num_cache_slots if not args.no_cache else 'off'}, "
              f"compiled: {not args.no_cache and not args.no_compile}, BLAS: {loaded_blas()}")
    if args.prompts_file:
        return _batch_main(args, model, tokenizer, sampler, decoding, processors)

    ids = encode_prompt(tokenizer, args.prompt)
    args.max_tokens = fit_max_tokens(model, len(ids), args.max_tokens)
    warning = check_length(model, len(ids), args.max_tokens)
    if warning:
        print(warning, file=sys.stderr)
    print("=" * 10)
    print(args.prompt, end="", flush=True)
    response = None
    for response in stream_generate(model, tokenizer, ids, args.max_tokens, sampler=sampler,
                                    ignore_eos=args.ignore_eos, use_cache=not args.no_cache,
                                    compile=not args.no_compile, **decoding,
                                    logits_processors=processors):
        print(response.text, end="", flush=True)
    print()
    if response is not None:
        print_stats(response)
        for line in decoding_lines(**decoding):
            print(line)


if __name__ == "__main__":
    main()
