"""Speculative recursion against plain cached decoding: acceptance, tokens/s, identical ids.

    python benchmarks/speculative.py --model runs/compare600/trm_tinystories_1m/model \
        --draft-steps 1 2 --num-draft-tokens 2 4 8 --draft-model mlx_trm/assets/model

Prompts: the first ``--prompt-tokens`` tokens of the first ``--prompts`` validation stories of
``--data``. Every setting decodes each prompt greedily for exactly ``--max-tokens`` tokens (batch
1, end-of-story ignored), one prompt at a time, the settings in turn for each prompt, so a load
change on the machine touches them all alike. Decode tok/s: generated tokens over the time from
the first token to the last (the prefill is not counted, as mlx-lm's "Generation" figure).
Each setting's ids are checked against the plain decoder's, token for token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_trm.blas import prepare_cpu_backend  # noqa: E402
from mlx_trm.checkpoint import load  # noqa: E402
from mlx_trm.data.batches import load_eval_tokens  # noqa: E402
from mlx_trm.generation.generate import generate_tokens  # noqa: E402
from mlx_trm.generation.speculative import speculation  # noqa: E402


def decode(model, prompt: list[int], max_tokens: int, spec=None) -> tuple[list[int], float]:
    """Greedy ids and the seconds from the first token to the last."""
    ids, first = [], None
    for y, _ in generate_tokens([prompt], model, max_tokens=max_tokens, speculation=spec):
        ids.append(y.item())
        if first is None:
            first = time.perf_counter()
    return ids, time.perf_counter() - first


def settings(args, model) -> list[tuple[str, dict]]:
    out = [("plain", {})]
    if model.args.halt_max_steps > 1:
        for n in args.draft_steps:
            if n < model.args.halt_max_steps:
                out += [(f"N={n} K={k}", dict(draft_steps=n, num_draft_tokens=k))
                        for k in args.num_draft_tokens]
    if args.draft_model:
        draft, _ = load(args.draft_model)
        out += [(f"draft model K={k}", dict(draft_model=draft, num_draft_tokens=k))
                for k in args.num_draft_tokens]
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="tinystories-sample")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--draft-steps", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--num-draft-tokens", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--draft-model", default=None, help="also draft with this model")
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    args = parser.parse_args(argv)

    prepare_cpu_backend()
    model, tokenizer = load(args.model)
    valid = load_eval_tokens(args.data, tokenizer, "validation", max_stories=args.prompts)
    prompts = [valid.story(i)[:args.prompt_tokens].tolist() for i in range(args.prompts)]
    runs = settings(args, model)
    stats = {name: dict(tokens=0, seconds=0.0, same=0, spec=None) for name, _ in runs}
    for _, kw in runs:  # warm-up: every compiled function traced once
        spec = speculation(model, **kw) if kw else None
        decode(model, prompts[0], 12, spec)
    for i, prompt in enumerate(prompts):
        plain_ids = None
        for name, kw in runs:
            spec = speculation(model, **kw) if kw else None
            ids, seconds = decode(model, prompt, args.max_tokens, spec)
            plain_ids = plain_ids or ids
            s = stats[name]
            s["tokens"] += len(ids) - 1
            s["seconds"] += seconds
            s["same"] += ids == plain_ids
            if spec is not None:
                total = s["spec"] or dict(rounds=0, drafted=0, accepted=0, emitted=0)
                for key in total:
                    total[key] += getattr(spec, key)
                s["spec"] = total
        so_far = ", ".join(f"{name} {s['tokens'] / s['seconds']:.1f}" for name, s in stats.items())
        print(f"prompt {i + 1}/{len(prompts)}: tok/s so far {so_far}", file=sys.stderr, flush=True)
    base = stats["plain"]["tokens"] / stats["plain"]["seconds"]
    records = []
    print(f"model {args.model} ({model.args.kind}, {model.args.halt_max_steps} ACT steps), "
          f"{args.prompts} prompts x {args.max_tokens} greedy tokens, batch 1")
    print("| setting | decode tok/s | vs plain | draft acceptance | tokens per verification "
          "| ids identical |")
    print("|---|---|---|---|---|---|")
    for name, _ in runs:
        s = stats[name]
        rate = s["tokens"] / s["seconds"]
        sp = s["spec"]
        acc = f"{sp['accepted'] / sp['drafted']:.1%}" if sp else "-"
        per = f"{sp['emitted'] / sp['rounds']:.2f}" if sp else "1"
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {acc} | {per} | "
              f"{s['same']}/{args.prompts} |")
        records.append(dict(setting=name, tok_s=rate, speedup=rate / base, identical=s["same"],
                            prompts=args.prompts, **(sp or {})))
    if args.json:
        args.json.write_text(json.dumps(dict(model=args.model, records=records), indent=1))
    return records


if __name__ == "__main__":
    main()
