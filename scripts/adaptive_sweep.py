"""The compute-quality curve of adaptive recursion per token (mlx_trm.generation.adaptive).

    python scripts/adaptive_sweep.py --run runs/adaptive/dense_act --max-steps 4 8 16 \
        --stories 40 --out benchmarks/results

For each ``--max-steps`` N (4 is the trained depth of the 1M ACT configs) and each criterion
(kl, latent, q) over a sweep of thresholds: held-out token CE and mean ACT steps per token under
the teacher-forced adaptive evaluation, and batch-1 greedy decode tokens/s of the adaptive cached
decoder (with its own steps per token). Reference points: the fixed depths 1..N with today's
evaluation and cached decoder. Writes ``adaptive_recursion.json`` (after every point, so a long
sweep can be cut short), ``adaptive_recursion.md`` and ``adaptive_recursion.png`` into ``--out``;
``--report-only`` redraws them from the JSON.

Decode speed is the best of ``--repeats`` runs of ``--gen-tokens`` tokens after a warm-up (on a
shared machine other processes only ever slow a run down), and each point's speed-up is against
the trained fixed depth measured the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# log grids: successive ACT steps approach a fixed point, each step's change ~10x smaller
THRESHOLDS = {"kl": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1],
              "latent": [1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3],
              "q": [0.0, 2.0, 5.0, 10.0]}
PROMPT = "Once upon a time"


def decode_speed(model, ids: list[int], n: int, repeats: int, policy=None) -> dict:
    """Batch-1 greedy decode tokens/s, best of ``repeats`` runs after a warm-up: per second of
    wall time and per second of this process's CPU time (which other processes on a shared
    machine disturb far less), and the decoder's ACT steps per token."""
    from mlx_trm.generation.generate import generate_tokens

    wall = cpu = 0.0
    steps = float(model.args.halt_max_steps)
    for rep in range(repeats + 1):
        if policy is not None:
            policy.tokens = policy.act_steps = 0
        for i, (y, _) in enumerate(generate_tokens([ids], model, max_tokens=n,
                                                   halt_policy=policy)):
            y.item()
            if i == 0:  # the prompt is in: time the decode steps only
                tic, cpu_tic = time.perf_counter(), time.process_time()
        if rep > 0:
            wall = max(wall, (n - 1) / (time.perf_counter() - tic))
            cpu = max(cpu, (n - 1) / max(time.process_time() - cpu_tic, 1e-9))
        if policy is not None:
            steps = policy.steps_per_token
    return {"decode_tps": wall, "decode_cpu_tps": cpu, "decode_steps_per_token": steps}


def sweep(args: argparse.Namespace) -> dict:
    from mlx_trm.checkpoint import load
    from mlx_trm.generation.adaptive import halt_policy
    from mlx_trm.training.evaluation import evaluate_adaptive, evaluate_model

    out_json = args.out / args.json
    result = json.loads(out_json.read_text()) if out_json.is_file() and args.resume else {
        "command": "python scripts/adaptive_sweep.py " + " ".join(sys.argv[1:]),
        "run": str(args.run), "stories": args.stories, "gen_tokens": args.gen_tokens,
        "fixed": [], "adaptive": []}
    done = {(p["max_steps"], p["criterion"], p["threshold"]) for p in result["adaptive"]}
    done |= {(p["max_steps"], "fixed", None) for p in result["fixed"]}
    trained, tok = load(args.run)
    ids = tok.encode(PROMPT)
    eval_kw = dict(max_stories=args.stories, batch_size=16)

    def save(kind: str, point: dict) -> None:
        result[kind].append(point)
        out_json.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(point), file=sys.stderr, flush=True)

    for n in sorted({*args.fixed, *args.max_steps}):
        if (n, "fixed", None) in done:
            continue
        model, _ = load(args.run, model_config={"halt_max_steps": n})
        ce = evaluate_model(model, tok, args.data, progress=False, **eval_kw)["token_ce"]
        speed = decode_speed(model, ids, args.gen_tokens, args.repeats)
        save("fixed", {"max_steps": n, "val_token_ce": ce, **speed})
    for n in args.max_steps:
        model, _ = load(args.run, model_config={"halt_max_steps": n})
        for criterion in args.criteria:
            for t in args.thresholds or THRESHOLDS[criterion]:
                if (n, criterion, t) in done:
                    continue
                policy = halt_policy(model, criterion, t)
                r = evaluate_adaptive(model, tok, args.data, policy, **eval_kw)
                speed = decode_speed(model, ids, args.gen_tokens, args.repeats, policy)
                save("adaptive", {"max_steps": n, "criterion": criterion, "threshold": t,
                                  "val_token_ce": r["token_ce"],
                                  "act_steps_per_token": r["act_steps_per_token"], **speed})
    return result


def merged(out: Path) -> dict:
    """The points of every sweep in ``out`` (several processes may have shared the work)."""
    result: dict = {"command": [], "fixed": [], "adaptive": []}
    for path in sorted(out.glob("adaptive_recursion*.json")):
        part = json.loads(path.read_text())
        result["command"].append(part["command"])
        result.update({k: part[k] for k in ("run", "stories", "gen_tokens")})
        have = {p["max_steps"] for p in result["fixed"]}
        result["fixed"] += [p for p in part["fixed"] if p["max_steps"] not in have]
        result["adaptive"] += part["adaptive"]
    result["command"] = "`; `".join(result["command"])
    return result


def write_report(result: dict, out: Path, trained_steps: int = 4) -> None:
    """adaptive_recursion.md (one table per max steps) and adaptive_recursion.png."""
    fixed = {p["max_steps"]: p for p in result["fixed"]}
    base = fixed.get(trained_steps)
    lines = [f"Command: `{result['command']}`", "",
             f"Model: `{result['run']}`; held-out CE on the first {result['stories']} validation "
             f"stories; decode: batch 1, greedy, {result['gen_tokens']} tokens, best of the "
             "repeats (shared 2-core CPU: speeds are noisy).", ""]
    if base:
        lines += [f"Trained fixed depth ({trained_steps} ACT steps): CE {base['val_token_ce']:.4f}"
                  f", {base['decode_cpu_tps']:.1f} tok per CPU-second (today's cached decoder). "
                  f"Goal: >= 1.5x that speed at CE <= {base['val_token_ce'] + 0.02:.4f}. The "
                  "speed-up is in tokens per CPU-second (this process's CPU time, which the "
                  "other jobs on the machine disturb far less than wall time); wall tok/s "
                  "beside it.", ""]
    lines += ["| setting | ACT steps/token (eval) | val CE | ΔCE vs trained | tok/CPU-s | "
              "speed-up | wall tok/s | steps/token (decode) |", "|---" * 8 + "|"]

    def row(name, steps, p, gen_steps):
        d = p["val_token_ce"] - base["val_token_ce"] if base else float("nan")
        s = p["decode_cpu_tps"] / base["decode_cpu_tps"] if base else float("nan")
        ok = " **goal**" if base and d <= 0.02 and s >= 1.5 else ""
        lines.append(f"| {name} | {steps:.2f} | {p['val_token_ce']:.4f} | {d:+.4f} | "
                     f"{p['decode_cpu_tps']:.1f} | {s:.2f}x{ok} | {p['decode_tps']:.1f} | "
                     f"{gen_steps:.2f} |")

    for n, p in sorted(fixed.items()):
        row(f"fixed {n} steps", n, p, n)
    for n in sorted({p["max_steps"] for p in result["adaptive"]}):
        for p in result["adaptive"]:
            if p["max_steps"] == n:
                row(f"{p['criterion']} < {p['threshold']:g}, max {n}", p["act_steps_per_token"],
                    p, p["decode_steps_per_token"])
    (out / "adaptive_recursion.md").write_text("\n".join(lines) + "\n")
    plot(result, out / "adaptive_recursion.png", base)


def plot(result: dict, path: Path, base: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    fixed = sorted(result["fixed"], key=lambda p: p["max_steps"])
    for ax, x_fixed, x_key in ((axes[0], "max_steps", "act_steps_per_token"),
                               (axes[1], "decode_cpu_tps", "decode_cpu_tps")):
        ax.plot([p[x_fixed] for p in fixed], [p["val_token_ce"] for p in fixed], "k-o",
                markersize=4, label="fixed depth 1..N")
        groups = sorted({(p["criterion"], p["max_steps"]) for p in result["adaptive"]})
        for criterion, n in groups:
            pts = sorted((p[x_key], p["val_token_ce"]) for p in result["adaptive"]
                         if p["criterion"] == criterion and p["max_steps"] == n)
            style = {4: "-", 8: "--", 16: ":"}.get(n, "-.")
            ax.plot(*zip(*pts), style, marker="o", markersize=3, label=f"{criterion}, max {n}")
        if base:
            ax.axhline(base["val_token_ce"] + 0.02, color="gray", linewidth=1, linestyle="--",
                       label="trained CE + 0.02")
        ax.set_ylabel("validation token CE (nats)")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("mean ACT steps per token (teacher-forced evaluation)")
    axes[1].set_xlabel("batch-1 decode tokens per CPU-second")
    if base:
        axes[1].axvline(1.5 * base["decode_cpu_tps"], color="gray", linewidth=1, linestyle=":",
                        label="1.5x trained fixed depth")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Adaptive recursion per token: {Path(result['run']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "adaptive" / "dense_act")
    parser.add_argument("--data", default="tinystories-sample")
    parser.add_argument("--max-steps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--fixed", type=int, nargs="*", default=[1, 2, 3, 4],
                        help="fixed depths to measure besides --max-steps")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="instead of each criterion's default grid")
    parser.add_argument("--json", default="adaptive_recursion.json",
                        help="file in --out for this sweep's points (the report merges all "
                        "adaptive_recursion*.json there)")
    parser.add_argument("--criteria", nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--stories", type=int, default=40)
    parser.add_argument("--gen-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--resume", action="store_true", help="keep the points already in the JSON")
    parser.add_argument("--report-only", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        from mlx_trm.blas import prepare_cpu_backend

        prepare_cpu_backend()
        sweep(args)
    write_report(merged(args.out), args.out)
    print((args.out / "adaptive_recursion.md").read_text())


if __name__ == "__main__":
    main()
