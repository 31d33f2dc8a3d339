"""Train every 1M variant on the same budget and compare them (the reference's headline question).

    python scripts/compare_variants.py --data tinystories-sample --steps 1000 \
        --out benchmarks/results

For each variant: train with the same token budget, schedule and data order, evaluate held-out
token cross-entropy on the validation split, measure training and cached generation tokens/s and
peak memory, and keep a greedy sample. For the recursive variants, evaluate again with more or
less test-time recursion (``halt_max_steps`` 1..16, ``L_cycles`` overrides). Writes
``results.json``, ``results.md`` (tables) and ``loss_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["trm_tinystories_1m_flat", "trm_tinystories_1m_noact", "trm_tinystories_1m",
            "trm_tinystories_1m_moeut", "trm_tinystories_1m_moeut_act"]
PROMPT = "Once upon a time"


def unigram_cross_entropy(data: str, tokenizer) -> float:
    """Held-out CE of the train split's (add-one) unigram distribution: the baseline to beat."""
    from mlx_trm.data.batches import load_tokens

    train = load_tokens(data, tokenizer, split="train")
    valid = load_tokens(data, tokenizer, split="validation")
    tokens = np.asarray(train.tokens)
    counts = np.bincount(tokens[tokens > 0], minlength=tokenizer.vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    # the evaluated targets: every story token but the first (no BOS), end-of-story excluded
    targets = np.concatenate([np.asarray(valid.story(i))[1:-1] for i in range(len(valid))])
    return float(-logp[targets].mean())


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """Train (or resume) one variant with the shared budget, then measure it."""
    from mlx_trm.config import ConfigError, load_config
    from mlx_trm.training.run import run
    from mlx_trm.training.run_dir import check_same_training

    run_dir = args.runs / name
    overrides = [
        f"data.path={args.data}", f"data.packing={str(args.packing).lower()}",
        f"model.seq_len={args.seq_len}", f"train.global_batch_size={args.batch_size}",
        f"train.max_steps={args.steps}", f"train.lr={args.lr}",
        f"train.lr_warmup_percent={args.warmup}", "train.lr_min_ratio=0.01",
        f"train.eval_interval_sequences={args.eval_every * args.batch_size}",
        f"train.checkpoint_interval_sequences={args.eval_every * args.batch_size}",
        f"out_dir={run_dir}", "train.resume=true",
    ]
    config = load_config(ROOT / "configs" / f"{name}.yaml", overrides)
    if config.model.halt_max_steps > 1:  # the warm-up only changes how ACT variants train
        config.train.act_warmup_percent = args.act_warmup
        config.validate()
    try:  # run() refuses it too; here the fix is another --runs
        check_same_training(run_dir, config)
    except ConfigError as e:
        sys.exit(f"error: {e} (here: pass another --runs directory or remove that run)")
    run(config)  # a finished run is only reloaded
    # A finished run measured with these settings before (a comparison of many hours resumed
    # in a later session) keeps its row: the sweep is the slow part of a variant's evaluation.
    settings = {"data": relative_path(args.data), "step": train_state(run_dir)["step"],
                **{k: getattr(args, k) for k in ("eval_stories", "sweep", "sweep_stories",
                                                  "gen_tokens")}}
    saved = run_dir / "comparison_row.json"
    if saved.is_file() and (cached := json.loads(saved.read_text()))["settings"] == settings:
        print(f"{name}: finished and measured before, row reused from {saved}", file=sys.stderr)
        return cached["row"]
    row = measure_variant(name, run_dir, args)
    saved.write_text(json.dumps({"settings": settings, "row": row}, indent=2) + "\n")
    return row


def measure_variant(name: str, run_dir: Path, args: argparse.Namespace) -> dict:
    """Evaluate, time and sample a trained run (plus the test-time sweep for TRMs)."""
    from mlx_trm.checkpoint import load
    from mlx_trm.generation.generate import stream_generate
    from mlx_trm.training.evaluation import evaluate_model

    train_seconds = train_state(run_dir)["elapsed"]  # training steps only, summed over resumes
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_sec" in r]
    train_tps = statistics.median(r["tokens_per_sec"] for r in steps[1:] or steps)
    peak = max(r["peak_memory_gb"] for r in steps)

    model, tok = load(run_dir)
    result = evaluate_model(model, tok, args.data, progress=False, max_stories=args.eval_stories)
    responses = list(stream_generate(model, tok, PROMPT, max_tokens=args.gen_tokens,
                                     ignore_eos=True))
    sample = "".join(r.text for r in stream_generate(model, tok, PROMPT, max_tokens=100))
    row = {
        "variant": name, "parameters": int(sum(v.size for _, v in _flat(model))),
        "tokens_trained": args.steps * args.batch_size * args.seq_len,
        "val_token_ce": result["token_ce"], "val_perplexity": result["perplexity"],
        "val_bits_per_byte": result["bits_per_byte"], "val_latent_spread": result["latent_spread"],
        "train_tokens_per_sec": train_tps, "train_seconds": train_seconds,
        "generation_tokens_per_sec": responses[-1].generation_tps,
        "peak_memory_gb": peak, "sample": PROMPT + sample,
        "run_dir": relative_path(run_dir),
    }
    if not model.args.flat_transformer:
        row["trained"] = trained_settings(run_dir)
    if not model.args.flat_transformer and args.sweep:
        row["test_time"] = test_time_sweep(run_dir, model.args, args, tok)
    return row


def train_state(run_dir: Path) -> dict:
    """The run's last checkpoint state: step, elapsed training seconds, ..."""
    from mlx_trm.training.run_dir import MODEL_SUBDIR, TRAIN_STATE

    return json.loads((run_dir / MODEL_SUBDIR / TRAIN_STATE / "state.json").read_text())


def relative_path(path: Path | str) -> str:
    """``path`` relative to the project root when it lies beside it (results carry no
    machine-specific absolute paths), else as given."""
    path = Path(path)
    # normalised without resolving symbolic links: a linked ../shared stays ../shared
    if path.is_absolute() and Path(os.path.abspath(path)).is_relative_to(ROOT.parent):
        return os.path.relpath(os.path.abspath(path), ROOT)
    return str(path)


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.trainable_parameters())


def test_time_sweep(run_dir: Path, trained, args: argparse.Namespace, tokenizer) -> list[dict]:
    """Held-out CE with more or less inference-time recursion than the model was trained with."""
    from mlx_trm.checkpoint import load
    from mlx_trm.training.evaluation import evaluate_model

    settings = [{"halt_max_steps": n} for n in (1, 2, 4, 8, 16)]
    L = trained.L_cycles
    settings += [{"L_cycles": n} for n in sorted({max(1, L // 2), L + 2, 2 * L}) if n != L]
    rows = []
    for override in settings:
        model, _ = load(run_dir, model_config=override)
        result = evaluate_model(model, tokenizer, args.data, progress=False,
                                max_stories=args.sweep_stories)
        rows.append({**override, "val_token_ce": result["token_ce"]})
        print(f"  {run_dir.name} {override}: {result['token_ce']:.4f}", file=sys.stderr)
    return rows


def machine_meta(command: str, baseline: float) -> dict:
    from mlx_trm.blas import loaded_blas

    return {"command": command, "machine": f"{platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} cores", "mlx_version": mx.__version__,
            "device": str(mx.default_device()), "blas": loaded_blas(),
            "unigram_val_token_ce": baseline}


def trained_settings(run_dir: Path) -> dict:
    import yaml

    model = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    return {"halt_max_steps": model["halt_max_steps"], "L_cycles": model["L_cycles"]}


def write_report(rows: list[dict], meta: dict, out: Path) -> None:
    """results.json, results.md (tables, samples) and the two PNGs into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    baseline, command = meta["unigram_val_token_ce"], meta["command"]
    sweeps = [r for r in rows if r.get("test_time")]
    for r in sweeps:  # records written before "trained" was recorded: read the run's config
        if "trained" not in r:
            r["trained"] = trained_settings(ROOT / r["run_dir"])
    (out / "results.json").write_text(json.dumps({"meta": meta, "variants": rows}, indent=2))
    lines = [f"Command: `{command}`", "",
             f"Machine: {meta['machine']}, MLX {meta['mlx_version']} ({meta['device']}, BLAS: "
             f"{meta.get('blas', '?')}). "
             f"Unigram baseline (same tokenizer): {baseline:.3f} nats.", ""]
    if meta.get("act_warmup"):
        lines += [f"The ACT variants train their first {meta['act_warmup']:.0%} of steps with "
                  "one ACT step per batch (`--act-warmup`, `train.act_warmup_percent`); the "
                  "reference recipe (0) left them at the unigram plateau in every short run "
                  "tried (benchmarks/results/README.md).", ""]
    lines += ["| variant | params | val CE (nats) | ppl | vs unigram | latent spread | "
              "train tok/s | gen tok/s (cached) | peak GB |", "|---" * 9 + "|"]
    for r in rows:
        spread = f"{r['val_latent_spread']:.2g}" if "val_latent_spread" in r else "–"
        lines.append(f"| {r['variant']} | {r['parameters']:,} | {r['val_token_ce']:.3f} | "
                     f"{r['val_perplexity']:.1f} | {r['val_token_ce'] / baseline:.2f} | {spread} | "
                     f"{r['train_tokens_per_sec']:,.0f} | {r['generation_tokens_per_sec']:,.0f} | "
                     f"{r['peak_memory_gb']:.2f} |")
    if sweeps:
        halts = sorted({s["halt_max_steps"] for r in sweeps for s in r["test_time"]
                        if "halt_max_steps" in s})
        lines += ["", "Test-time recursion: val CE (nats) with other inference settings than "
                  "trained, on the first stories of the validation split (see sweep_stories "
                  "in results.json); * marks the trained setting.", "",
                  "| variant | " + " | ".join(f"halt_max_steps={n}" for n in halts)
                  + " | L_cycles overrides |", "|---|" + "---|" * (len(halts) + 1)]
        for r in sweeps:
            by_halt = {s["halt_max_steps"]: s["val_token_ce"] for s in r["test_time"]
                       if "halt_max_steps" in s}
            trained = r["trained"]
            cells = [f"{by_halt[n]:.3f}{'*' if n == trained['halt_max_steps'] else ''}"
                     if n in by_halt else "" for n in halts]
            l_cells = [f"L={s['L_cycles']}: {s['val_token_ce']:.3f}" for s in r["test_time"]
                       if "L_cycles" in s]
            l_cells.append(f"(trained L={trained['L_cycles']})")
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " | "
                         + ", ".join(l_cells) + " |")
    lines += ["", "Greedy samples:", ""]
    lines += [f"- **{r['variant']}**: {r['sample']!r}" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from plot_metrics import plot_runs, plot_test_time, read_run

        runs = [ROOT / r["run_dir"] for r in rows]
        if all((run / "metrics.jsonl").is_file() for run in runs):
            plot_runs([read_run(run) for run in runs], out / "loss_curves.png",
                      "1M variants on the same budget", baseline)
        else:  # --report-only without the run directories (a fresh clone)
            print("run directories are missing: loss_curves.png left as it is", file=sys.stderr)
        if sweeps:
            plot_test_time(sweeps, out / "test_time_recursion.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[plot]')", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tinystories-sample",
                        help="stories (default: the TinyStories sample shipped in the package)")
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--act-warmup", type=float, default=0.5,
                        help="share of the steps ACT variants train with one ACT step per batch "
                        "(train.act_warmup_percent; 0 = the reference recipe)")
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--eval-stories", type=int, default=None, help="default: all")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sweep-stories", type=int, default=300)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results.md and the plots from --out/results.json")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.report_only:
        saved = json.loads((args.out / "results.json").read_text())
        write_report(saved["variants"], saved["meta"], args.out)
        print((args.out / "results.md").read_text())
        return
    from mlx_trm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    baseline = unigram_cross_entropy(args.data, tokenizer)
    print(f"unigram baseline: {baseline:.4f} nats", file=sys.stderr)
    rows = [run_variant(name, args) for name in args.variants]
    command = "python scripts/compare_variants.py " + " ".join(argv or sys.argv[1:])
    meta = {**machine_meta(command, baseline), "eval_stories": args.eval_stories,
            "sweep_stories": args.sweep_stories, "act_warmup": args.act_warmup}
    write_report(rows, meta, args.out)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
