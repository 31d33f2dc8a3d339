"""The comparison, plotting and demo-model scripts, end to end on a tiny budget."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import mlx.core as mx
import pytest
import yaml

from mlx_trm.checkpoint import load
from tests.conftest import ROOT, TINYSTORIES

sys.path.insert(0, str(ROOT / "scripts"))
import compare_variants  # noqa: E402
import make_demo_model  # noqa: E402
import plot_metrics  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """Two reference variants (flat and dense TRM + ACT) trained for 3 tiny steps each."""
    tmp = tmp_path_factory.mktemp("compare")
    argv = ["--data", str(TINYSTORIES), "--variants", "trm_tinystories_1m_flat",
            "trm_tinystories_1m", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
            "--eval-every", "1", "--eval-stories", "4", "--sweep-stories", "2",
            "--gen-tokens", "3", "--runs", str(tmp / "runs"), "--out", str(tmp / "out")]
    compare_variants.main(argv)
    return tmp


def test_compare_variants_records_every_variant(comparison):
    results = json.loads((comparison / "out" / "results.json").read_text())
    meta, rows = results["meta"], results["variants"]
    assert [r["variant"] for r in rows] == ["trm_tinystories_1m_flat", "trm_tinystories_1m"]
    assert 5 < meta["unigram_val_token_ce"] < math.log(10000)
    assert meta["sweep_stories"] == 2
    for r in rows:
        assert r["tokens_trained"] == 3 * 2 * 32  # the same budget for every variant
        assert math.isfinite(r["val_token_ce"]) and r["val_token_ce"] > 0
        assert r["train_tokens_per_sec"] > 0 and r["generation_tokens_per_sec"] > 0
        assert r["sample"].startswith("Once upon a time")
    flat, act = rows
    assert "test_time" not in flat  # nothing to recurse
    assert act["trained"] == {"halt_max_steps": 4, "L_cycles": 6}
    halts = [s["halt_max_steps"] for s in act["test_time"] if "halt_max_steps" in s]
    assert halts == [1, 2, 4, 8, 16]
    assert sorted(s["L_cycles"] for s in act["test_time"] if "L_cycles" in s) == [3, 8, 12]
    # the sweep really changed the model: different recursion, different cross-entropy
    assert len({round(s["val_token_ce"], 6) for s in act["test_time"]}) > 1
    # the ACT warm-up (default 0.5) is set for the ACT variant only
    trained = {r["variant"]: yaml.safe_load((ROOT / r["run_dir"] / "config.yaml").read_text())
               for r in rows}  # ROOT / an absolute path is that path
    assert trained["trm_tinystories_1m"]["train"]["act_warmup_percent"] == 0.5
    assert trained["trm_tinystories_1m_flat"]["train"]["act_warmup_percent"] == 0.0


def test_a_run_trained_with_other_settings_is_not_resumed(comparison):
    argv = ["--data", str(TINYSTORIES), "--variants", "trm_tinystories_1m", "--steps", "3",
            "--batch-size", "2", "--seq-len", "32", "--runs", str(comparison / "runs"),
            "--out", str(comparison / "other"), "--act-warmup", "0"]
    with pytest.raises(SystemExit, match="act_warmup_percent: 0.5 vs 0.0"):
        compare_variants.main(argv)


def test_a_finished_variant_is_not_retrained_and_keeps_its_row(comparison, capsys):
    first = json.loads((comparison / "out" / "results.json").read_text())["variants"][0]
    assert first["train_seconds"] > 0
    argv = ["--data", str(TINYSTORIES), "--variants", "trm_tinystories_1m_flat", "--steps", "3",
            "--batch-size", "2", "--seq-len", "32", "--gen-tokens", "3",
            "--runs", str(comparison / "runs"), "--out", str(comparison / "again")]
    compare_variants.main([*argv, "--eval-stories", "4", "--sweep-stories", "2"])  # as before
    assert "row reused" in capsys.readouterr().err
    again = json.loads((comparison / "again" / "results.json").read_text())["variants"][0]
    assert again == first
    # other evaluation settings: measured again, on the same (not retrained) weights
    compare_variants.main([*argv, "--eval-stories", "3", "--sweep-stories", "2"])
    assert "row reused" not in capsys.readouterr().err
    third = json.loads((comparison / "again" / "results.json").read_text())["variants"][0]
    assert third["val_token_ce"] != first["val_token_ce"]
    assert third["train_seconds"] == first["train_seconds"]


def test_results_name_paths_relative_to_the_project():
    assert compare_variants.relative_path(ROOT / "runs" / "x") == "runs/x"
    assert compare_variants.relative_path(ROOT.parent / "shared" / "d") == "../shared/d"
    assert compare_variants.relative_path("runs/x") == "runs/x"


def test_results_name_a_linked_shared_folder_by_its_own_name(tmp_path, monkeypatch):
    """A ../shared that is a symbolic link stays ../shared (not the link's target)."""
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "shared").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setattr(compare_variants, "ROOT", tmp_path / "project")
    assert compare_variants.relative_path(tmp_path / "shared" / "d") == "../shared/d"


def test_compare_report_tables_and_plots(comparison):
    out = comparison / "out"
    report = (out / "results.md").read_text()
    assert "| trm_tinystories_1m_flat | 1,033,346 |" in report and "latent spread" in report
    assert "| trm_tinystories_1m | 1,066,114 |" in report
    assert "halt_max_steps=16" in report and "(trained L=6)" in report
    assert "first 50% of steps with one ACT step per batch" in report
    if HAS_MATPLOTLIB:
        for png in ("loss_curves.png", "test_time_recursion.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the report is rebuilt from results.json alone
    (out / "results.md").unlink()
    compare_variants.main(["--report-only", "--out", str(out)])
    assert (out / "results.md").read_text() == report


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="plotting needs matplotlib (the plot extra)")
def test_plot_metrics_cli(comparison, capsys):
    runs = comparison / "runs"
    run = plot_metrics.read_run(runs / "trm_tinystories_1m")
    assert [x for x, _ in run["valid"]] == [0, 64, 128, 192]  # tokens seen at each evaluation
    assert [x for x, _ in run["spread"]] == [0, 64, 128, 192]  # drawn in a third panel
    assert all(0 <= v <= 1 for _, v in run["spread"])
    png = comparison / "curves.png"
    plot_metrics.main([str(runs / "trm_tinystories_1m_flat"), str(runs / "trm_tinystories_1m"),
                       "--out", str(png)])
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot_metrics.main([str(comparison), "--out", str(png)])
    with pytest.raises(SystemExit, match="one label per run"):
        plot_metrics.main([str(runs / "trm_tinystories_1m"), "--labels", "a", "b"])


def test_make_demo_model_ships_float16_weights_that_generate(comparison, tmp_path):
    from mlx_trm.generation.generate import stream_generate

    run = comparison / "runs" / "trm_tinystories_1m_flat"
    out = make_demo_model.make_demo(run, tmp_path / "demo", note="test")
    weights = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float16}
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["training_config"]["train"]["max_steps"] == 3
    assert provenance["last_evaluation"]["val_token_ce"] > 0
    model, tokenizer = load(out)
    assert tokenizer is not None
    assert model.embed_tokens.embedding_weight.dtype == mx.float32  # computes in float32
    text = "".join(r.text for r in stream_generate(model, tokenizer, "Once", max_tokens=3))
    assert text


def test_device_check_dry_run_writes_one_table_naming_the_device(tmp_path):
    """scripts/device_check.sh --dry-run: its steps (device, parity tests, every benchmark suite)
    at tiny sizes on this machine's default device, and the one table it writes."""
    out = tmp_path / "check.md"
    env = {k: v for k, v in os.environ.items() if k != "MLX_TRM_KERNELS"}
    result = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    text = out.read_text()
    device = "cpu" if mx.default_device() == mx.cpu else "gpu"
    assert text.startswith(f"## Device check on {device} (") and "(dry run: tiny sizes)" in text
    assert re.search(r"Parity tests \(`pytest -m kernels`\): [1-9]\d* passed, \d+ deselected",
                     text) and "failed" not in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]
    shapes = {(r[0].strip("| "), r[3]) for r in rows}
    assert {("train", "2x16"), ("train", "4x16"), ("generate", "1x(4+3)"),
            ("moe", "2x16")} <= shapes
    assert text.count("| suite |") == 1 and f"| {device} (" in text  # one table, its device
