"""Smoke tests of benchmarks/tokens_per_second.py: every suite at the smallest settings."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decode_ab  # noqa: E402
import moe_layers  # noqa: E402
import tokens_per_second as tps  # noqa: E402

SMALL = ["--configs", "trm_tinystories_1m_noact_1l", "--batch-size", "1", "--seq-len", "16",
         "--repeats", "1", "--warmup", "0", "--max-tokens", "4"]
FIELDS = {"suite", "config", "variant", "phase", "batch_size", "seq_len", "tokens_per_sec",
          "tokens_per_sec_min", "tokens_per_sec_max", "ms_per_run", "peak_memory_gb", "repeats",
          "warmup", "device", "mlx_version", "platform", "machine", "cpu_count", "blas",
          "load_avg_1m"}
VARIANTS = {
    "train": {("compiled", "step"), ("uncompiled", "step")},
    "generate": {(v, p) for v in ("cached", "cached-uncompiled", "uncached")
                 for p in ("prompt", "generation")},
    "moe": {(v, "fwd+bwd") for v in ("gather", "gather+compile", "dense")},
}


@pytest.mark.parametrize("suite", ["train", "generate", "moe"])
def test_suite_records(suite: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "records.json"
    returned = tps.main(["--suite", suite, *SMALL, "--json", str(out)])
    records = json.loads(out.read_text())
    assert records == returned and records
    for r in records:
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        assert r["suite"] == suite
        assert 0 < r["tokens_per_sec_min"] <= r["tokens_per_sec"] <= r["tokens_per_sec_max"]
        assert r["peak_memory_gb"] > 0
        assert r["repeats"] == 1 and r["warmup"] == 0 and r["batch_size"] == 1
        assert r["mlx_version"] == mx.__version__
        assert r["blas"] in ("openblas", "accelerate", "mkl", "blis", "reference", "unknown",
                             "n/a (gpu)")
    assert {(r["variant"], r["phase"]) for r in records} == VARIANTS[suite]
    if suite == "train":
        assert {r["config"] for r in records} == {"trm_tinystories_1m_noact_1l"}
        assert all(r["seq_len"] == 16 and r["tokens_per_run"] == 16 for r in records)
    if suite == "generate":
        by_phase = {(r["variant"], r["phase"]): r for r in records}
        assert by_phase["cached", "generation"]["generation_tokens"] == 4
        assert by_phase["cached", "generation"]["tokens_per_run"] == 3  # the first comes free
        assert by_phase["uncached", "prompt"]["prompt_tokens"] == 32
    if suite == "moe":
        assert len({r["config"] for r in records}) == 4  # sigma-MoE, SwitchHead x 1M, 10M
        assert all(r["speedup_vs_dense"] > 0 for r in records)
    screen = capsys.readouterr()
    assert "tok/s" in screen.out and "BLAS" in screen.out
    assert f"[{len(records) // (2 if suite == 'generate' else 3 if suite == 'moe' else 1)}/" \
        in screen.err  # progress lines


def test_markdown_table(capsys: pytest.CaptureFixture) -> None:
    tps.main(["--suite", "moe", "--moe-sizes", "1M", "--batch-size", "1", "--seq-len", "8",
              "--repeats", "1", "--warmup", "0", "--markdown"])
    out = capsys.readouterr().out
    assert "| suite | config | variant |" in out
    assert "| moe | sigma-MoE 1M (E=8, k=2) | dense | 1x8 |" in out


def test_unknown_config_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        tps.main(["--suite", "train", "--configs", "no_such_arch"])
    assert e.value.code == 2
    assert "trm_tinystories_1m_flat" in capsys.readouterr().err


def test_moe_layers_still_runs_alone() -> None:
    rows = moe_layers.bench_moe_layers(tokens=16, seq_len=16, repeats=1, budget_s=0.0,
                                       shapes=moe_layers.SHAPES[:1])
    assert [r["variant"] for r in rows] == ["gather", "gather+compile", "dense"]
    assert all(r["ms"] > 0 for r in rows)


def test_default_plan() -> None:
    """The defaults: train and moe at 8 x 512, generate at batch 1 (as mlx_trm.generate)."""
    jobs = tps.plan(tps.parse_args([]))
    by_suite: dict[str, list[dict]] = {}
    for suite, _, _, kwargs in jobs:
        by_suite.setdefault(suite, []).append(kwargs)
    assert len(by_suite["train"]) == 2 * len(tps.TRAIN_CONFIGS)
    assert all(k["batch_size"] == 8 and k["seq_len"] == 512 for k in by_suite["train"])
    assert len(by_suite["generate"]) == 3 * len(tps.GENERATE_CONFIGS)
    assert all(k["batch_size"] == 1 and k["prompt_tokens"] == 32 for k in by_suite["generate"])
    assert {k["max_tokens"] for k in by_suite["generate"]} == {128, 32}
    assert len(by_suite["moe"]) == 4
    assert all(k["batch_size"] == 8 for k in by_suite["moe"])
    assert all(k["warmup"] == 1 and k["repeats"] == 3 for ks in by_suite.values() for k in ks)


@pytest.mark.skipif(platform.system() != "Linux", reason="the bundled-BLAS check is Linux only")
def test_reports_the_slow_bundled_blas(tmp_path: Path) -> None:
    """Without the OpenBLAS preload, MLX uses its bundled BLAS: the records and the screen say
    so, even though numpy's own OpenBLAS is loaded in the process."""
    out = tmp_path / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    script = Path(tps.__file__)
    result = subprocess.run(
        [sys.executable, str(script), "--suite", "moe", "--moe-sizes", "1M", "--batch-size", "1",
         "--seq-len", "8", "--repeats", "1", "--warmup", "0", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert {r["blas"] for r in json.loads(out.read_text())} == {"reference"}
    assert "LD_PRELOAD" in result.stderr and "slow bundled BLAS" in result.stdout


@pytest.mark.skipif("openblas" not in os.environ.get("LD_PRELOAD", ""),
                    reason="OpenBLAS is not preloaded")
def test_reports_the_preloaded_openblas() -> None:
    assert tps.environment()["blas"] == "openblas"


def test_train_records_checkpointing_and_max_rss(tmp_path: Path) -> None:
    out = tmp_path / "records.json"
    tps.main(["--suite", "train", *SMALL, "--uncompiled", "none",
              "--checkpoint-activations", "on", "--json", str(out)])
    (r,) = json.loads(out.read_text())
    assert r["variant"] == "compiled +ckpt" and r["checkpoint_activations"] is True
    assert r["max_rss_gb"] > 0 and r["estimated_peak_gb"] > 0


def test_speculative_benchmark_checks_ids_and_times_a_round(tmp_path: Path, capsys) -> None:
    """benchmarks/speculative.py on a tiny dense TRM + ACT: every setting's ids are the plain
    decoder's (it counts them), and --costs times one draft and one verification pass."""
    import speculative
    from conftest import save_small_model

    model = save_small_model(tmp_path / "model", seq_len=48)
    common = ["--model", str(model), "--prompts", "2", "--prompt-tokens", "4",
              "--draft-steps", "1", "--num-draft-tokens", "2", "3"]
    records = speculative.main([*common, "--max-tokens", "8"])
    assert [r["setting"] for r in records] == ["plain", "N=1 K=2", "N=1 K=3"]
    assert all(r["identical"] == 2 for r in records)
    assert all(r["emitted"] >= r["rounds"] for r in records[1:])
    assert speculative.main([*common, "--costs"]) == []
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("| 1 | 2 |") and lines[-1].startswith("| 1 | 3 |")


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / ".git").exists(),
                    reason="needs the git repository")
def test_decode_ab_times_a_commit_beside_this_checkout(capsys: pytest.CaptureFixture) -> None:
    rows = decode_ab.main(["--before", "HEAD", "--configs", "trm_tinystories_1m_noact_1l",
                           "--batch-size", "2", "--rounds", "2", "--max-tokens", "3"])
    (row,) = rows
    assert row["same_ids"] and row["batch"] == 2 and row["before"] > 0 and row["after"] > 0
    assert len(row["rounds"]["before"]) == len(row["rounds"]["after"]) == 2
    import mlx_trm.models
    before = sys.modules["mlx_trm_before.models"]
    assert Path(before.__file__).parent != Path(mlx_trm.models.__file__).parent
    assert "| trm_tinystories_1m_noact_1l | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse's usage error: the first token is not timed
        decode_ab.main(["--before", "HEAD", "--max-tokens", "1"])
    assert "--max-tokens must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="name a commit of this repository"):
        decode_ab.main(["--before", "no-such-commit", "--configs", "trm_tinystories_1m_noact_1l"])
