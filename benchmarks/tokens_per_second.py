"""Tokens per second of mlx_trm: the training step, generation, and the MoE layers.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/tokens_per_second.py [--suite train|generate|moe|all] [--configs ...]
            [--batch-size B] [--seq-len T] [--repeats N] [--warmup N] [--max-tokens N]
            [--json OUT] [--markdown]

(The LD_PRELOAD is for Linux only; on a Mac run plain ``python benchmarks/...``.)

Suites:
  train     the full training step (forward, backward, clipping, MoE bias/entropy hooks, AdamW,
            selector renorm) as ``mlx_trm.train`` runs it, compiled and uncompiled;
            tokens/s = batch_size * seq_len / step time.
  generate  prompt (prefill) and generation (decode) tokens/s of random-init models, greedy,
            never stopping early: cached (compiled decode step), cached eager, and uncached
            (the reference's full re-forward per token).
  moe       sigma-MoE and SwitchHead layers alone, forward + backward, gather-based experts vs
            the dense all-experts oracle, at the 1M (E=8) and 10M (E=192) shapes.

Every figure: ``--warmup`` untimed runs (compilation happens there), then ``--repeats`` timed
runs; the median tokens/s and the min-max over the timed runs; peak memory over the timed runs
(``mx.reset_peak_memory`` before them). Records carry the device, MLX version, machine, CPU count,
machine load and the BLAS in use, so a pasted table says what it was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mlx_trm from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # moe_layers

from moe_layers import SHAPES, make_steps  # noqa: E402

from mlx_trm.blas import loaded_blas, prepare_cpu_backend  # noqa: E402
from mlx_trm.config import load_config  # noqa: E402
from mlx_trm.generation.generate import generate_tokens  # noqa: E402
from mlx_trm.kernels import kernels_setting, metal_kernels  # noqa: E402
from mlx_trm.models import build_model, initial_carry  # noqa: E402
from mlx_trm.training.memory import fit_memory  # noqa: E402
from mlx_trm.training.step import make_optimizer, make_step_functions, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("train", "generate", "moe")
TRAIN_CONFIGS = [
    "trm_tinystories_1m_flat",
    "trm_tinystories_1m_noact_1l",
    "trm_tinystories_1m",
    "trm_tinystories_1m_noact",
    "trm_tinystories_1m_moeut",
    "trm_tinystories_1m_moeut_act",
]
GENERATE_CONFIGS = [
    "trm_tinystories_1m_flat",
    "trm_tinystories_1m",
    "trm_tinystories_1m_moeut_act",
]
MOE_SIZES = ("1M", "10M")


# ---------------------------------------------------------------------------------- environment


def device_name() -> str:
    try:
        name = mx.device_info().get("device_name", "")
    except Exception:  # older MLX, or no info for this device
        name = ""
    return name or platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """What every record says about where it was measured."""
    device = mx.default_device()
    on_cpu = device.type == mx.cpu
    return {
        "device": f"{'cpu' if on_cpu else 'gpu'} ({device_name()})",
        "mlx_version": mx.__version__,
        "platform": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "blas": loaded_blas() if on_cpu else "n/a (gpu)",
        # the branches the model takes (mlx_trm/kernels.py): the device's, or MLX_TRM_KERNELS's
        "kernels": f"{'metal' if metal_kernels() else 'cpu'}"
                   f"{'' if kernels_setting() else ' (by device)'}",
        "python": platform.python_version(),
    }


def max_rss_gb() -> float:
    """The process's largest resident set so far (ru_maxrss: KB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---------------------------------------------------------------------------------- timing


def time_runs(run: Callable[[], Any], warmup: int, repeats: int) -> tuple[list[Any], float]:
    """``warmup`` untimed calls, then ``repeats`` timed calls of ``run``.

    ``run`` returns what it measured (seconds, or a tuple of them); the result is the list of
    those and the peak memory (GB) over the timed calls.
    """
    for _ in range(warmup):
        run()
    mx.synchronize()
    mx.reset_peak_memory()
    results = [run() for _ in range(repeats)]
    return results, mx.get_peak_memory() / 1e9


def rates(tokens: int, seconds: list[float]) -> dict[str, float]:
    """Median and min-max tokens/s over the runs, and the median time of one run in ms."""
    tps = [tokens / s for s in seconds]
    return {
        "tokens_per_sec": statistics.median(tps),
        "tokens_per_sec_min": min(tps),
        "tokens_per_sec_max": max(tps),
        "ms_per_run": statistics.median(seconds) * 1e3,
    }


def record(suite: str, config: str, variant: str, phase: str, batch_size: int, seq_len: int,
           tokens: int, seconds: list[float], peak_gb: float, warmup: int,
           env: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "suite": suite, "config": config, "variant": variant, "phase": phase,
        "batch_size": batch_size, "seq_len": seq_len, "tokens_per_run": tokens,
        **rates(tokens, seconds),
        "peak_memory_gb": peak_gb, "repeats": len(seconds), "warmup": warmup, **extra,
        "load_avg_1m": load_average(), **env,
    }


def config_path(name: str) -> str:
    """A config name (``trm_tinystories_1m``) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return str(path)
    return str(ROOT / "configs" / f"{name}.yaml")


# ---------------------------------------------------------------------------------- train


CHECKPOINTING = {"auto": None, "on": True, "off": False}


def bench_train(config: str, batch_size: int, seq_len: int, compile: bool, warmup: int,
                repeats: int, env: dict[str, Any], checkpoint: str = "auto") -> dict[str, Any]:
    """The full optimizer step of ``mlx_trm.train`` on random tokens.

    ``checkpoint`` is ``train.checkpoint_activations`` (auto: as ``mlx_trm.train`` decides it
    for this device, from the peak it measures on 1 and 2 rows).
    """
    c = load_config(config_path(config), [f"model.seq_len={seq_len}",
                                          f"train.global_batch_size={batch_size}"])
    c.train.checkpoint_activations = CHECKPOINTING[checkpoint]
    mx.random.seed(0)
    model = build_model(c.model)
    optimizer = make_optimizer(c.train)
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    fit = fit_memory(model, c, warn=False)
    step_fns = make_step_functions(model, optimizer, c.train, compile=compile)
    inputs = mx.random.randint(1, c.model.vocab_size, (batch_size, seq_len)).astype(mx.int32)
    labels = mx.random.randint(1, c.model.vocab_size, (batch_size, seq_len)).astype(mx.int32)
    carry = initial_carry(model, batch_size, seq_len)
    mx.eval(model.parameters(), optimizer.state, inputs, labels, carry)
    step = 0

    def run() -> float:
        nonlocal carry, step
        step += 1
        start = time.perf_counter()
        carry, metrics, grad_norm = train_step(step_fns, carry, inputs, labels, 1,
                                               mx.random.key(step))
        mx.eval(carry, metrics, grad_norm, model.state, optimizer.state)
        return time.perf_counter() - start

    seconds, peak = time_runs(run, warmup, repeats)
    variant = "compiled" if compile else "uncompiled"
    if model.checkpoint_activations:
        variant += " +ckpt"
    return record("train", c.model.name, variant, "step", batch_size, seq_len,
                  batch_size * seq_len, seconds, peak, warmup, env,
                  checkpoint_activations=model.checkpoint_activations,
                  estimated_peak_gb=fit["estimated_peak_gb"], max_rss_gb=max_rss_gb())


# ---------------------------------------------------------------------------------- generate


def bench_generate(config: str, batch_size: int, prompt_tokens: int, max_tokens: int,
                   use_cache: bool, compile: bool, warmup: int, repeats: int,
                   env: dict[str, Any]) -> list[dict[str, Any]]:
    """Prompt and generation tokens/s of ``generate_tokens`` (the engine behind
    ``mlx_trm.generate``), greedy, exactly ``max_tokens`` new tokens per row.

    Prompt time: the call until the first new token (prefill, as mlx-lm's "Prompt" figure);
    generation time: from the first new token to the last, i.e. ``max_tokens - 1`` decode steps.
    """
    c = load_config(config_path(config))
    mx.random.seed(0)
    model = build_model(c.model)
    mx.eval(model.parameters())
    prompts = mx.random.randint(1, c.model.vocab_size, (batch_size, prompt_tokens)).tolist()

    def run() -> tuple[float, float]:
        start = time.perf_counter()
        first = last = start
        for n, (y, _) in enumerate(generate_tokens(prompts, model, max_tokens=max_tokens,
                                                   use_cache=use_cache, compile=compile)):
            y.tolist()  # wait for the token, as a caller printing it would
            last = time.perf_counter()
            if n == 0:
                first = last
        return first - start, last - first

    results, peak = time_runs(run, warmup, repeats)
    variant = "uncached" if not use_cache else "cached" if compile else "cached-uncompiled"
    common = dict(suite="generate", config=c.model.name, variant=variant,
                  batch_size=batch_size, seq_len=prompt_tokens + max_tokens, peak_gb=peak,
                  warmup=warmup, env=env, prompt_tokens=prompt_tokens,
                  generation_tokens=max_tokens)
    return [
        record(phase="prompt", tokens=batch_size * prompt_tokens,
               seconds=[p for p, _ in results], **common),
        record(phase="generation", tokens=batch_size * (max_tokens - 1),
               seconds=[g for _, g in results], **common),
    ]


# ---------------------------------------------------------------------------------- moe


def bench_moe(name: str, kind: str, kwargs: dict, batch_size: int, seq_len: int, warmup: int,
              repeats: int, env: dict[str, Any]) -> list[dict[str, Any]]:
    """One MoE layer (benchmarks/moe_layers.py's shapes), forward + backward, every variant."""
    steps, h = make_steps(kind, kwargs, batch_size, seq_len)
    records = []
    for variant, step in steps.items():

        def run(step: Callable = step) -> float:
            start = time.perf_counter()
            mx.eval(step(h))
            return time.perf_counter() - start

        seconds, peak = time_runs(run, warmup, repeats)
        records.append(record("moe", f"{name} (E={kwargs['n_experts']}, k={kwargs['k']})",
                              variant, "fwd+bwd", batch_size, seq_len, batch_size * seq_len,
                              seconds, peak, warmup, env))
    dense = next(r for r in records if r["variant"] == "dense")
    for r in records:
        r["speedup_vs_dense"] = r["tokens_per_sec"] / dense["tokens_per_sec"]
    return records


# ---------------------------------------------------------------------------------- output


def describe(r: dict[str, Any]) -> tuple[str, str]:
    """(variant label, shape label) of a record for the table."""
    variant = r["variant"] if r["suite"] != "generate" else f"{r['variant']} {r['phase']}"
    if r["suite"] == "generate":
        shape = f"{r['batch_size']}x({r['prompt_tokens']}+{r['generation_tokens']})"
    else:
        shape = f"{r['batch_size']}x{r['seq_len']}"
    if "speedup_vs_dense" in r and r["variant"] != "dense":
        variant += f" ({r['speedup_vs_dense']:.1f}x vs dense)"
    return variant, shape


def table_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in records:
        variant, shape = describe(r)
        rows.append([r["suite"], r["config"], variant, shape, f"{r['tokens_per_sec']:,.0f}",
                     f"{r['tokens_per_sec_min']:,.0f}-{r['tokens_per_sec_max']:,.0f}",
                     f"{r['ms_per_run']:,.1f}", f"{r['peak_memory_gb']:.3f}"])
    return rows


HEADER = ["suite", "config", "variant", "B x T", "tok/s", "min-max", "ms/run", "peak GB"]


def environment_line(env: dict[str, Any]) -> str:
    blas = env["blas"]
    if blas == "reference":
        blas += " (MLX's slow bundled BLAS: matmuls ~30x slow, see benchmarks/README.md)"
    return (f"MLX {env['mlx_version']} | {env['device']} | {env['platform']} {env['machine']}, "
            f"{env['cpu_count']} cores | BLAS: {blas} | kernels: {env['kernels']}")


def print_table(records: list[dict[str, Any]], env: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(HEADER):
        table.add_column(name, justify="right" if i >= 4 else "left", no_wrap=i != 1)
    suite = None
    for r, row in zip(records, table_rows(records)):
        if suite is not None and r["suite"] != suite:
            table.add_section()
        suite = r["suite"]
        table.add_row(*row)
    console = Console(width=max(140, Console().width))
    console.print(table)
    print(environment_line(env))


def markdown_table(records: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [f"`{environment_line(env)}`", "",
             "| " + " | ".join(HEADER) + " |",
             "|" + "|".join("---:" if i >= 4 else "---" for i in range(len(HEADER))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(records)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tokens per second of mlx_trm: training step, generation, MoE layers.",
        epilog="Defaults take about 10 minutes on a 2-core Linux CPU with OpenBLAS.")
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    parser.add_argument("--configs", nargs="+", default=None,
                        help="configs (names in configs/ or YAML paths) for train and generate "
                             f"(default train: {' '.join(TRAIN_CONFIGS)}; "
                             f"generate: {' '.join(GENERATE_CONFIGS)})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per step (default: 8 for train and moe, 1 for generate)")
    parser.add_argument("--seq-len", type=int, default=512,
                        help="tokens per row for train and moe (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    parser.add_argument("--uncompiled", choices=("all", "none"), default="all",
                        help="train: also time the uncompiled step (default all)")
    parser.add_argument("--checkpoint-activations", choices=tuple(CHECKPOINTING),
                        default="auto",
                        help="train: train.checkpoint_activations (default auto: on only when "
                             "the step would not fit this device's memory without it)")
    parser.add_argument("--prompt-tokens", type=int, default=32,
                        help="generate: prompt length (default 32)")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="generate: new tokens per cached run (default 128)")
    parser.add_argument("--max-tokens-uncached", type=int, default=32,
                        help="generate: new tokens per uncached run (full re-forward per token; "
                             "default 32, at most --max-tokens)")
    parser.add_argument("--moe-sizes", nargs="+", choices=MOE_SIZES, default=list(MOE_SIZES),
                        help="moe: layer shapes of the 1M (E=8 / 2) and 10M (E=192 / 32) models")
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    parser.add_argument("--markdown", action="store_true",
                        help="also print the table as GitHub markdown")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("repeats", "seq_len", "prompt_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.max_tokens < 2 or args.max_tokens_uncached < 2:
        parser.error("--max-tokens and --max-tokens-uncached must be >= 2 (the first new token "
                     "comes from the prompt pass; generation tokens/s times the rest)")
    for name in args.configs or []:
        if not Path(config_path(name)).is_file():
            known = " ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
            parser.error(f"no config {name!r}; choose from: {known} (or give a YAML path)")
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, str, Callable[..., Any], dict]]:
    """The measurements to make, in order: (suite, label, bench function, its arguments)."""
    suites = SUITES if args.suite == "all" else (args.suite,)
    jobs: list[tuple[str, str, Callable[..., Any], dict]] = []
    timing = dict(warmup=args.warmup, repeats=args.repeats)
    if "train" in suites:
        for config in args.configs or TRAIN_CONFIGS:
            for compiled in (True, False) if args.uncompiled == "all" else (True,):
                jobs.append(("train", f"{config} {'compiled' if compiled else 'uncompiled'}",
                             bench_train, dict(config=config, batch_size=args.batch_size or 8,
                                               seq_len=args.seq_len, compile=compiled,
                                               checkpoint=args.checkpoint_activations,
                                               **timing)))
    if "generate" in suites:
        variants = [("cached", True, True, args.max_tokens),
                    ("cached-uncompiled", True, False, args.max_tokens),
                    ("uncached", False, True, min(args.max_tokens_uncached, args.max_tokens))]
        for config in args.configs or GENERATE_CONFIGS:
            for label, cache, compiled, tokens in variants:
                jobs.append(("generate", f"{config} {label}", bench_generate,
                             dict(config=config, batch_size=args.batch_size or 1,
                                  prompt_tokens=args.prompt_tokens, max_tokens=tokens,
                                  use_cache=cache, compile=compiled, **timing)))
    if "moe" in suites:
        for name, kind, kwargs in SHAPES:
            if name.split()[-1] in args.moe_sizes:
                jobs.append(("moe", name, bench_moe,
                             dict(name=name, kind=kind, kwargs=kwargs,
                                  batch_size=args.batch_size or 8, seq_len=args.seq_len,
                                  **timing)))
    return jobs


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    env = environment()
    prepare_cpu_backend()
    print(environment_line(env), file=sys.stderr)
    load_at_start = load_average()
    print(f"load average at start: {load_at_start} (close other work for numbers worth "
          f"pasting); warm-up {args.warmup}, timed runs {args.repeats} per figure",
          file=sys.stderr)
    jobs = plan(args)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, (suite, label, bench, kwargs) in enumerate(jobs, 1):
        tic = time.perf_counter()
        new = bench(**kwargs, env=env)
        new = new if isinstance(new, list) else [new]
        mx.clear_cache()  # the next model starts from a clean allocator
        records += new
        summary = ", ".join(f"{describe(r)[0]} {r['tokens_per_sec']:,.0f} tok/s" for r in new)
        print(f"[{i}/{len(jobs)}] {suite} {label}: {summary} "
              f"({time.perf_counter() - tic:.1f} s)", file=sys.stderr, flush=True)
    total = time.perf_counter() - start
    title = (f"mlx_trm tokens per second ({len(records)} figures in {total:.0f} s; "
             f"load average {load_at_start} at start, {load_average()} at end)")
    print_table(records, env, title)
    if args.markdown:
        print(markdown_table(records, env))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
        print(f"wrote {len(records)} records to {args.json}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
