"""Draw loss curves of training runs: ``python scripts/plot_metrics.py RUN ... --out x.png``.

Each RUN is a run directory written by ``mlx_trm.train`` (its ``metrics.jsonl`` and
``config.yaml``). The left panel shows the training loss (smoothed), the right one the held-out
token cross-entropy, both against tokens seen; a third panel shows the latent spread (log
scale) when the runs logged it: a TRM collapsed onto one read-out sits near zero. Needs
matplotlib (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def read_run(run_dir: Path) -> dict:
    """Training and validation points of one run, x in tokens seen."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"error: {run_dir} has no metrics.jsonl; pass a run directory written "
                         "by mlx_trm.train")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (
        run_dir / "config.yaml").is_file() else {}
    seq_len = config.get("model", {}).get("seq_len", 512)
    train, valid, spread = [], [], []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        tokens = record["sequences"] * seq_len
        if "loss" in record:
            train.append((tokens, record["loss"]))
        if "val_token_ce" in record:
            valid.append((tokens, record["val_token_ce"]))
        if "val_latent_spread" in record:
            spread.append((tokens, record["val_latent_spread"]))
    return {"label": run_dir.name, "train": train, "valid": valid, "spread": spread}


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, as TensorBoard's smoothing slider."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot_runs(runs: list[dict], out: Path, title: str = "", baseline: float | None = None
              ) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_spread = any(run.get("spread") for run in runs)
    fig, axes = plt.subplots(1, 3 if with_spread else 2, figsize=(18 if with_spread else 12, 4.5))
    left, right = axes[0], axes[1]
    # A run keeps its colour in every panel, also where runs without a spread are left out.
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        if run["train"]:
            x, y = zip(*run["train"])
            left.plot(x, smooth(list(y)), label=run["label"], color=color)
        if run["valid"]:
            x, y = zip(*run["valid"])
            right.plot(x, y, marker="o", markersize=3, label=run["label"], color=color)
    for ax, name in ((left, "training loss (smoothed)"), (right, "validation token CE (nats)")):
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="unigram")
    right.legend(fontsize=8)
    if with_spread:
        for run, color in zip(runs, colors):
            if run.get("spread"):
                x, y = zip(*run["spread"])
                axes[2].semilogy(x, [max(v, 1e-12) for v in y], marker="o", markersize=3,
                                 label=run["label"], color=color)
        axes[2].set_xlabel("tokens seen")
        axes[2].set_ylabel("latent spread (share of z_H variance across positions)")
        axes[2].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_test_time(rows: list[dict], out: Path, baseline: float | None = None) -> Path:
    """Held-out CE against inference-time recursion (``halt_max_steps``, ``L_cycles``), one
    line per variant; ``rows`` are compare_variants.py records with a ``test_time`` sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, knob in zip(axes, ("halt_max_steps", "L_cycles")):
        for row in rows:
            points = sorted((s[knob], s["val_token_ce"]) for s in row.get("test_time", [])
                            if knob in s)
            trained = row.get("trained", {}).get(knob)
            if knob == "L_cycles" and trained is not None:
                # the trained L_cycles is the sweep's point at the trained halt_max_steps
                halt = row["trained"].get("halt_max_steps")
                points = sorted({*points, *((trained, s["val_token_ce"]) for s in row["test_time"]
                                            if s.get("halt_max_steps") == halt)})
            if points:
                x, y = zip(*points)
                line, = ax.plot(x, y, marker="o", markersize=4, label=row["variant"])
                if trained is not None:
                    ax.axvline(trained, color=line.get_color(), alpha=0.25, linewidth=4)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{knob} at inference (shaded: as trained)")
        ax.set_ylabel("validation token CE (nats)")
        ax.grid(alpha=0.3)
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="unigram")
    axes[0].legend(fontsize=8)
    fig.suptitle("Test-time recursion: more refinement at inference than in training?")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=Path("loss_curves.png"))
    parser.add_argument("--title", default="")
    parser.add_argument("--baseline", type=float, default=None, help="draw a horizontal line")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the "
                        "run directory's name)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit(f"error: {len(args.labels)} --labels for {len(args.runs)} runs; give "
                         "one label per run")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install -e '.[plot]'") from None
    runs = [read_run(r) for r in args.runs]
    for run, label in zip(runs, args.labels or []):
        run["label"] = label
    out = plot_runs(runs, args.out, args.title, args.baseline)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
