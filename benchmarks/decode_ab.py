"""Decode tok/s of this checkout against another commit, both in one process, alternating.

    python benchmarks/decode_ab.py --before 3a4943a --batch-size 1 10
    python benchmarks/decode_ab.py --before HEAD~3 --configs trm_tinystories_1m_moeut_act

Timings on a shared machine move 10-40% between runs, so two benchmark processes run minutes
apart compare the machine's moods as much as the code. Here the other commit's package is
extracted with ``git archive`` and imported beside this one (as ``mlx_trm_before``); both sides
get the same random-init weights and the same random prompts, must produce the same greedy ids,
and are timed in alternating rounds (before/after, then after/before, ...), so both see the same
machine. A row is tok/s of the cached, compiled decoder over the tokens after the first (the
prefill is not counted), summed over the batch: the median of the rounds, then every round.
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = ["trm_tinystories_1m", "trm_tinystories_1m_flat", "trm_tinystories_1m_moeut",
                   "trm_tinystories_1m_moeut_act", "trm_tinystories_1m_noact"]
BEFORE = "mlx_trm_before"


def extract(rev: str, into: Path) -> Path:
    """The package and configs of commit ``rev`` under ``into``, the package renamed
    ``mlx_trm_before`` (its absolute imports of itself rewritten)."""
    try:
        tar = subprocess.run(["git", "archive", rev, "mlx_trm", "configs"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"error: cannot read commit {rev!r} of {ROOT}: "
                         f"{e.stderr.decode().strip()}; name a commit of this repository") from e
    # our own repository's files; the "data" filter where this Python has it (3.10.12+)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(fileobj=BytesIO(tar)) as archive:
        archive.extractall(into, **safe)
    (into / "mlx_trm").rename(into / BEFORE)
    for path in (into / BEFORE).rglob("*.py"):
        text = path.read_text()
        new = re.sub(r"\b(from|import) mlx_trm\b", rf"\1 {BEFORE}", text)
        if new != text:
            path.write_text(new)
    return into


def side(package: str) -> dict[str, Any]:
    """What the benchmark uses of one package: its config loader, model builder and
    ``generate_tokens`` (found where either layout keeps it)."""
    config = importlib.import_module(f"{package}.config")
    models = importlib.import_module(f"{package}.models")
    generate: ModuleType | None = None
    for where in ("generation.generate", "generate"):
        try:
            generate = importlib.import_module(f"{package}.{where}")
            break
        except ModuleNotFoundError:
            continue
    if generate is None or not hasattr(generate, "generate_tokens"):
        raise SystemExit(f"error: {package} has no generate_tokens (in generation/generate.py or "
                         "generate.py); name a commit from after the cached decoder was written")
    return {"load_config": config.load_config, "build_model": models.build_model,
            "generate_tokens": generate.generate_tokens}


def tokens_per_second(impl: dict, model: Any, prompts: list, max_tokens: int
                      ) -> tuple[float, list]:
    ids, start = [], None
    for i, (y, _) in enumerate(impl["generate_tokens"](prompts, model, max_tokens=max_tokens)):
        ids.append(y.tolist())
        if i == 0:
            start = time.perf_counter()
    return (max_tokens - 1) * len(prompts) / (time.perf_counter() - start), ids


def compare(config: str, batch: int, before: dict, after: dict, configs_before: Path,
            args: argparse.Namespace) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    model = after["build_model"](after["load_config"](ROOT / "configs" / f"{config}.yaml").model)
    old = before["build_model"](before["load_config"](configs_before / f"{config}.yaml").model)
    old.load_weights(tree_flatten(model.parameters()), strict=True)
    mx.eval(model.parameters(), old.parameters())
    vocab = model.args.vocab_size
    prompts = mx.random.randint(1, vocab, (batch, args.prompt_tokens),
                                key=mx.random.key(1)).tolist()
    sides = {"before": (before, old), "after": (after, model)}
    _, ids_before = tokens_per_second(before, old, prompts, args.max_tokens)  # also warms up
    _, ids_after = tokens_per_second(after, model, prompts, args.max_tokens)
    rates: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
            rates[name].append(tokens_per_second(*sides[name], prompts, args.max_tokens)[0])
    b, a = statistics.median(rates["before"]), statistics.median(rates["after"])
    return {"config": config, "batch": batch, "before": b, "after": a, "ratio": a / b,
            "same_ids": ids_before == ids_after, "rounds": rates}


def table(rows: list[dict], rev: str) -> str:
    lines = [f"| config | batch | before ({rev}) tok/s | after tok/s | after/before | "
             "same greedy ids | rounds before / after |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rounds = " / ".join(" ".join(f"{x:.0f}" for x in r["rounds"][k])
                            for k in ("before", "after"))
        lines.append(f"| {r['config']} | {r['batch']} | {r['before']:.1f} | {r['after']:.1f} | "
                     f"{r['ratio']:.2f}x | {'yes' if r['same_ids'] else 'NO'} | {rounds} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/decode_ab.py", description=__doc__.split(
        "\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True,
                        help="the commit to compare with (anything git names: a hash, HEAD~3)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="configs/NAME.yaml of both sides (default: the five 1M variants)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--rounds", type=int, default=4, help="timed runs of each side")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_tokens < 2 or args.rounds < 1 or args.prompt_tokens < 1:
        parser.error("--max-tokens must be at least 2 (the first token is not timed), --rounds "
                     "and --prompt-tokens at least 1")
    known = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    for name in args.configs:
        if name not in known:
            raise SystemExit(f"error: no configs/{name}.yaml; name one of {', '.join(known)}")
    for name in [m for m in sys.modules if m.split(".")[0] == BEFORE]:
        del sys.modules[name]  # an earlier call's commit
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(extract(args.before, Path(tmp))))
        before, after = side(BEFORE), side("mlx_trm")
        rows = []
        for config in args.configs:
            for batch in args.batch_size:
                rows.append(compare(config, batch, before, after, Path(tmp) / "configs", args))
                print(table(rows[-1:], args.before).splitlines()[-1], flush=True)
    print()
    print(table(rows, args.before))
    return rows


if __name__ == "__main__":
    main()
