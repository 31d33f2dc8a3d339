"""The original repository's generation sweep (its sampling-settings x ACT-steps grid over ten
fixed prompts), reproduced here with tokens/s per setting.

10 prompts (classic openings, mid-sentence, action, emotional, problem-solving) generated as one
batch for every sampling setting {(T=0, k=0), (0.3, 10), (0.5, 20), (0.8, 40)} and every
``halt_max_steps`` (the reference's 1 and 4, and beyond: 8 and 16 by default). As in the reference,
setting number i samples with seed 42 + i; the reference's eight settings come first in its order
(temperature-major, ACT steps 1 then 4), so their seeds are its seeds; 8 and 16 follow.

    python scripts/sweep_generation.py --model DIR [--max-tokens 512] [--output sweep.json]
    python scripts/sweep_generation.py --model DIR --max-tokens 32 --halt-max-steps 1 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_trm.blas import loaded_blas
from mlx_trm.cli.loading import load_for_generation
from mlx_trm.config import ConfigError, cli_errors
from mlx_trm.generation.generate import batch_generate
from mlx_trm.generation.sampling import make_sampler

PROMPTS = [
    # classic story openings (in-distribution)
    "Once upon a time, there was a little girl named Lily",
    "One day, a little boy named Tim found a big box",
    # mid-sentence (continuation)
    "She was very happy when",
    "The dog ran very fast to",
    # action / adventure
    "One sunny day, Ben and his friends went to explore",
    "The brave little mouse decided to",
    # emotional / character-driven
    "Emma felt sad because her toy was broken. She",
    "The kind teacher smiled and said",
    # problem solving
    "There was a problem. The ball was stuck in the tree, so",
    "When the rain started, everyone needed to find",
]
SAMPLING = [(0.0, 0), (0.3, 10), (0.5, 20), (0.8, 40)]


def sweep(args: argparse.Namespace) -> dict:
    # The reference's eight settings first (halt_max_steps 1 and 4), so their seeds match it.
    reference = [h for h in args.halt_max_steps if h in (1, 4)]
    beyond = [h for h in args.halt_max_steps if h not in (1, 4)]
    settings = [(t, k, h) for halts in (reference, beyond) for t, k in SAMPLING for h in halts]
    models = {}
    results = []
    for i, (temp, top_k, halt) in enumerate(settings):
        if halt not in models:  # the reference reloads per setting; weights do not change
            models[halt] = load_for_generation(argparse.Namespace(
                model=args.model, tokenizer=args.tokenizer, halt_max_steps=halt,
                l_cycles=args.l_cycles))
            # warm-up: one-time kernel compilation must not count in the first setting's speed
            batch_generate(*models[halt], PROMPTS, 2, batch_size=len(PROMPTS),
                           use_cache=not args.no_cache)
        model, tokenizer = models[halt]
        seed = args.seed + i
        mx.random.seed(seed)
        tic = time.perf_counter()
        out = batch_generate(model, tokenizer, PROMPTS, args.max_tokens,
                             batch_size=len(PROMPTS), sampler=make_sampler(temp, top_k=top_k),
                             use_cache=not args.no_cache, ignore_eos=args.ignore_eos)
        seconds = time.perf_counter() - tic
        s = out.stats
        print(f"[{i + 1}/{len(settings)}] temp={temp} top_k={top_k} halt_max_steps={halt}: "
              f"{s.generation_tokens} tokens, {s.generation_tps:.1f} tokens/s "
              f"(prompt {s.prompt_tps:.1f} tokens/s), {seconds:.1f} s", file=sys.stderr)
        results.append({
            "temperature": temp, "top_k": top_k, "halt_max_steps": halt, "seed": seed,
            "cache_slots": model.num_cache_slots,
            "tokens_per_sec": s.generation_tps, "prompt_tokens_per_sec": s.prompt_tps,
            "generation_tokens": s.generation_tokens, "prompt_tokens": s.prompt_tokens,
            "seconds": seconds, "peak_memory_gb": s.peak_memory,
            "stories": [{"prompt_id": j, "prompt": p, "completion": text.rstrip(),
                         "finish_reason": reason}
                        for j, (p, text, reason) in enumerate(
                            zip(PROMPTS, out.texts, out.finish_reasons))],
        })
    return {
        "model": str(args.model), "max_new_tokens": args.max_tokens, "seed": args.seed,
        "batch_size": len(PROMPTS), "cache": not args.no_cache, "blas": loaded_blas(),
        "generations": results,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--tokenizer", default=None, help="if the model directory has none")
    parser.add_argument("--halt-max-steps", type=int, nargs="+", default=[1, 4, 8, 16],
                        help="ACT steps to sweep (the reference: 1 4)")
    parser.add_argument("--l-cycles", type=int, default=None, help="test-time L_cycles")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="new tokens per story at most (small values make a quick run)")
    parser.add_argument("--seed", type=int, default=42, help="setting i samples with seed + i")
    parser.add_argument("--output", default=None,
                        help="JSON results (default: generation_sweep_results.json in --model)")
    parser.add_argument("--no-cache", action="store_true", help="the reference's re-forward loop")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens")
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise ConfigError("--max-tokens must be >= 1")
    results = sweep(args)
    out = Path(args.output) if args.output else Path(args.model) / "generation_sweep_results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(results['generations'])} settings to {out}")


if __name__ == "__main__":
    main()
