"""Speculative recursion against plain cached decoding: acceptance, tokens/s, identical ids.

    python benchmarks/speculative.py --model runs/compare600/trm_tinystories_1m/model \
        --draft-steps 1 2 --num-draft-tokens 2 4 8 --draft-model mlx_trm/assets/model

Prompts: the first ``--prompt-tokens`` tokens of the first ``--prompts`` validation stories of
``--data``. Every setting decodes each prompt greedily for exactly ``--max-tokens`` tokens (batch
1, end-of-story ignored), one prompt at a time, the settings in turn for each prompt, so a load
change on the machine touches them all alike. Decode tok/s: generated tokens over the time from
the first token to the last (the prefill is not counted, as mlx-lm's "Generation" figure).
Each setting's ids are checked against the plain decoder's, token for token.

``--costs``: instead, one draft pass and one verification pass of each (N, K), timed alone
against one plain decode step: what a round costs, in plain steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from mlx_trm.blas import blas_threads, prepare_cpu_backend  # noqa: E402
from mlx_trm.checkpoint import load  # noqa: E402
from mlx_trm.data.batches import load_eval_tokens  # noqa: E402
from mlx_trm.generation.decoders import CachedDecoder  # noqa: E402
from mlx_trm.generation.generate import generate_tokens  # noqa: E402
from mlx_trm.generation.speculative import SpeculativeDecoder, speculation  # noqa: E402


def decode(model, prompt: list[int], max_tokens: int, spec=None) -> tuple[list[int], float]:
    """Greedy ids and the seconds from the first token to the last."""
    ids, first = [], None
    for y, _ in generate_tokens([prompt], model, max_tokens=max_tokens, speculation=spec):
        ids.append(y.item())
        if first is None:
            first = time.perf_counter()
    return ids, time.perf_counter() - first


def _ms(fn, calls: int) -> float:
    """Best of three timings of ``calls`` evaluated calls, in ms per call (after a warm-up)."""
    for _ in range(3):
        mx.eval(fn())
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            mx.eval(fn())
        best = min(best, (time.perf_counter() - start) / calls * 1000)
    return best


def pass_costs(spec: SpeculativeDecoder, y: mx.array, k: int) -> tuple[float, float]:
    """ms of one draft pass (one position) and one verification pass (k + 1 positions)."""
    z = mx.zeros((1, k + 1, spec.model.args.hidden_size))
    ids = mx.zeros((1, k + 1), dtype=mx.int32)
    draft = _ms(lambda: spec.run(spec.draft_pass, y, spec.cache[:spec.split])[0], 30)
    verify = _ms(lambda: spec.run(spec.verify_pass, ids, spec.cache[spec.split:], z, z)[0], 15)
    return draft, verify


def round_costs(model, prompt: list[int], draft_steps: list[int], ks: list[int]) -> None:
    """One draft pass and one verification pass against one plain decode step, batch 1 (the
    same cache column is written again each call)."""
    y = mx.array([prompt[-1]])
    plain = CachedDecoder(model, [prompt], 64)
    plain.prefill()

    def plain_step():
        logits = plain(y)
        plain.rewind(1)
        return logits

    base = _ms(plain_step, 30)
    print(f"plain decode step: {base:.2f} ms; in brackets: x the plain step")
    print("| N | K | draft pass ms | verification ms | round (K+1 drafts + 1 verification) |")
    print("|---|---|---|---|---|")
    for n in draft_steps:
        for k in ks:
            spec = SpeculativeDecoder(model, [prompt], 64,
                                      speculation=speculation(model, k, draft_steps=n))
            spec.prefill()
            draft, verify = pass_costs(spec, y, k)
            print(f"| {n} | {k} | {draft:.2f} ({draft / base:.2f}) | {verify:.2f} "
                  f"({verify / base:.2f}) | {((k + 1) * draft + verify) / base:.2f} |")


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


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--costs", action="store_true",
                        help="only time one draft pass and one verification pass per setting "
                             "against one plain decode step")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)

    prepare_cpu_backend()
    model, tokenizer = load(args.model)
    valid = load_eval_tokens(args.data, tokenizer, "validation", max_stories=args.prompts)
    prompts = [valid.story(i)[:args.prompt_tokens].tolist() for i in range(args.prompts)]
    if args.costs:
        with blas_threads(1):  # as generate_tokens decodes
            round_costs(model, prompts[0], args.draft_steps, args.num_draft_tokens)
        return []
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
