"""Forward + backward time of the MoE layers: gather-based experts vs the dense all-experts oracle.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/moe_layers.py [--tokens 4096] [--repeats 10] [--json OUT]

Shapes are those of configs/trm_tinystories_{1m,10m}_moeut.yaml: sigma-MoE 1M (E=8) and 10M
(E=192), both 192-wide experts with k=2, and SwitchHead 1M (E=2) and 10M (E=32 per head), one
head, k=1, all at D=64. One timed run = loss, gradients w.r.t. every trainable parameter and the
input. The dense baseline is the test oracle of tests/moe_reference.py (run from the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_trm.models.layers import rms_norm  # noqa: E402
from mlx_trm.models.moe import SigmaMoE, SwitchHead  # noqa: E402
from tests.moe_reference import sigma_moe_dense, switch_head_dense  # noqa: E402

# (name, layer kind, constructor kwargs)
SHAPES = [
    ("sigma-MoE 1M", "ff", dict(hidden_size=64, n_experts=8, expert_size=192, k=2)),
    ("sigma-MoE 10M", "ff", dict(hidden_size=64, n_experts=192, expert_size=192, k=2)),
    ("SwitchHead 1M", "att", dict(hidden_size=64, num_heads=1, n_experts=2, k=1)),
    ("SwitchHead 10M", "att", dict(hidden_size=64, num_heads=1, n_experts=32, k=1)),
]


def blas_note() -> str:
    """Which BLAS the MLX CPU backend multiplies with (benchmark reports must say)."""
    if mx.default_device() != mx.cpu:
        return "n/a (GPU)"
    try:
        from mlx_trm.blas import blas_warning, loaded_blas
    except ImportError:  # the helper module is optional for this script
        return os.environ.get("LD_PRELOAD") or "unknown (no LD_PRELOAD)"
    warning = blas_warning()
    return loaded_blas() + (f"  [{warning}]" if warning else "")


def build(kind: str, kwargs: dict) -> nn.Module:
    if kind == "ff":
        return SigmaMoE(**kwargs, init_scale=0.5)
    return SwitchHead(**kwargs, init_scale=0.5)


def forward_fns(kind: str, layer: nn.Module):
    """{variant: f(h) -> output}; the normalised copy (selector / q,k input) is made inside."""
    if kind == "ff":
        return {"gather": lambda h: layer(h, rms_norm(h)),
                "dense": lambda h: sigma_moe_dense(layer, h, rms_norm(h))}
    return {"gather": lambda h: layer(rms_norm(h), h),
            "dense": lambda h: switch_head_dense(layer, rms_norm(h), h)}


def time_fn(fn, h: mx.array, warmup: int, repeats: int, budget_s: float) -> tuple[float, float]:
    """Median ms of up to ``repeats`` timed calls (at least 3, stopping once ``budget_s`` is
    spent) after ``warmup`` calls; peak memory in MB over the timed calls."""
    for _ in range(warmup):
        mx.eval(fn(h))
    mx.reset_peak_memory()
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        start = time.perf_counter()
        mx.eval(fn(h))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, mx.get_peak_memory() / 2**20


def make_steps(kind: str, kwargs: dict, batch_size: int, seq_len: int,
               compile_gather: bool = True) -> tuple[dict, mx.array]:
    """One layer of the given shape, its timed steps and their input ``h`` [B, T, D].

    Returns ``({variant: step}, h)`` with variants "gather", "gather+compile" (unless
    ``compile_gather`` is False) and "dense"; ``mx.eval(step(h))`` is one forward + backward
    (loss and gradients w.r.t. every trainable parameter and ``h``).
    """
    mx.random.seed(0)
    layer = build(kind, kwargs)
    h = mx.random.normal((batch_size, seq_len, kwargs["hidden_size"]))
    cot = mx.random.normal(h.shape)
    steps = {}
    for variant, forward in forward_fns(kind, layer).items():
        step = nn.value_and_grad(layer, lambda h, f=forward, c=cot: (f(h) * c).sum())
        steps[variant] = step
        if variant == "gather" and compile_gather:
            state = [layer.state]
            steps["gather+compile"] = mx.compile(step, inputs=state, outputs=state)
    return steps, h


def bench_moe_layers(tokens: int = 4096, seq_len: int = 512, repeats: int = 10,
                     budget_s: float = 10.0, compile_gather: bool = True,
                     shapes: list | None = None) -> list[dict]:
    """Rows of {layer, variant, ms, peak_mb, speedup} for every shape in ``shapes``."""
    rows = []
    for name, kind, kwargs in shapes or SHAPES:
        variants, h = make_steps(kind, kwargs, tokens // seq_len, seq_len, compile_gather)
        results = {}
        for variant, step in variants.items():
            warmup = 1 if variant == "dense" else 2  # the oracle takes seconds at E=192
            ms, peak = time_fn(step, h, warmup, repeats, budget_s)
            results[variant] = (ms, peak)
        for variant, (ms, peak) in results.items():
            rows.append(dict(layer=name, variant=variant, tokens=tokens, ms=ms, peak_mb=peak,
                             speedup=results["dense"][0] / ms, **kwargs))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (x512 rows)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per variant (max)")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="stop timing a variant after this many seconds (min 3 runs)")
    parser.add_argument("--no-compile", action="store_true", help="skip the mx.compile variant")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tokens % 512:
        parser.error("--tokens must be a multiple of 512 (rows of 512 positions)")

    info = dict(mlx=mx.__version__, device=str(mx.default_device()), blas=blas_note(),
                machine=f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores")
    print(f"MLX {info['mlx']} | device {info['device']} | {info['machine']}")
    print(f"BLAS: {info['blas']}")
    print("forward + backward (grads of all trainable params and the input), median ms\n")
    rows = bench_moe_layers(args.tokens, repeats=args.repeats, budget_s=args.budget,
                            compile_gather=not args.no_compile)
    header = (f"{'layer':<16}{'E':>5}{'k':>3}  {'variant':<16}{'ms':>10}{'vs dense':>10}"
              f"{'peak MB':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['layer']:<16}{r['n_experts']:>5}{r['k']:>3}  {r['variant']:<16}"
              f"{r['ms']:>10.1f}{r['speedup']:>9.1f}x{r['peak_mb']:>10.0f}")
    if args.json:
        args.json.write_text(json.dumps(dict(info=info, rows=rows), indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
