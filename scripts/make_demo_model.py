"""Package a trained run as the demo model that ``mlx_trm.generate`` and ``mlx_trm.chat`` use
when no ``--model`` is given.

    python scripts/make_demo_model.py runs/demo512 --note "how it was trained (the command)"

Writes ``mlx_trm/assets/model``: the run's model directory (config, tokenizer, mlx-lm files)
with float16 weights (a 1M-parameter model is ~2 MB, small enough to ship in the wheel) and
``provenance.json``: the run it came from, its training config, its last validation CE and the
step and sequences it was trained for (what ``mlx_trm.convert --mlx-to-torch`` reports).
Loading casts the weights back to float32; the float16 rounding is the demo model's own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx
import yaml
from compare_variants import relative_path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mlx_trm" / "assets" / "model"


def last_evaluation(run_dir: Path) -> dict | None:
    """The last evaluation record of a run's metrics.jsonl (None if it never evaluated)."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    evals = [r for r in records if "val_token_ce" in r]
    return evals[-1] if evals else None


def make_demo(run_dir: Path, out: Path = DEMO, note: str = "") -> Path:
    from mlx_trm.checkpoint import load, save

    model, tokenizer = load(run_dir)
    if tokenizer is None:
        raise SystemExit(f"error: {run_dir} has no tokenizer; a demo model must carry its own")
    model.set_dtype(mx.float16)
    save(out, model, tokenizer)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    # the shipped file names no path of the machine that made it
    config["out_dir"] = relative_path(config["out_dir"])
    config["data"]["path"] = relative_path(config["data"]["path"])
    state = json.loads((run_dir / "model" / "train_state" / "state.json").read_text())
    provenance = {
        "source_run": relative_path(run_dir),
        "step": state["step"],
        "sequences": state["sequences_seen"],
        "weights": "float16 (loaded as float32)",
        "last_evaluation": last_evaluation(run_dir),
        "training_config": config,
        "note": note,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by mlx_trm.train")
    parser.add_argument("--out", type=Path, default=DEMO)
    parser.add_argument("--note", default="", help="how the run was made (the command)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = make_demo(args.run_dir, args.out, args.note)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
