"""Shared test helpers: the shipped data and reference fixtures, and small model configs.

Everything the suite needs ships in the repository: the TinyStories sample in the package
(``mlx_trm/assets/tinystories``) and small reference fixtures in ``tests/fixtures/reference``
(made by the PyTorch reference's own code: scripts/make_reference_fixtures.py). The full-size
reference fixtures (vocabulary 10000, seq_len 512) are used as well when a folder of them sits at
``../shared/fixtures/seed_checkpoints`` beside the repository.

Tests marked ``reference_checkout`` run the reference's own scripts and need a checkout of it:
``REF_REPO=/path/to/TinyRecursiveModels python -m pytest``. Without REF_REPO they are
deselected (named in the session header), not skipped: they are opt-in, like the reference.
With REF_REPO but without the reference's own dependencies in this Python (``pip install -e
".[reference]"``), they are skipped with one line naming the missing modules.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from mlx_trm.config import ConfigError
from mlx_trm.kernels import ENV, kernels_setting

ROOT = Path(__file__).resolve().parents[1]
TINYSTORIES = ROOT / "mlx_trm" / "assets" / "tinystories"  # data.path=tinystories-sample
FIXTURES = ROOT / "tests" / "fixtures" / "reference"  # always there
FULL_FIXTURES = ROOT.parent / "shared" / "fixtures" / "seed_checkpoints"  # optional
CONFIGS = ROOT / "configs"
ARCHS = ["trm_tinystories_1m_flat", "trm_tinystories_1m", "trm_tinystories_1m_moeut",
         "trm_tinystories_1m_moeut_act"]


def reference_cases(archs: list[str] = ARCHS) -> list:
    """One pytest param per reference fixture folder: the small ones, then the full-size ones
    when present (ids ``small-<arch>`` / ``full-<arch>``)."""
    roots = [("small", FIXTURES)] + ([("full", FULL_FIXTURES)] if FULL_FIXTURES.is_dir() else [])
    return [pytest.param(root / arch, id=f"{label}-{arch}") for label, root in roots
            for arch in archs]


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "reference_checkout: needs REF_REPO, a checkout of the "
                            "reference (jhspaybar/TinyRecursiveModels)")
    config.addinivalue_line("markers", "kernels: runs under both sets of kernel branches (the "
                            "kernels fixture); scripts/device_check.sh runs these on a GPU")


# What the reference's own modules import beyond our dependencies (the `reference` extra)
REFERENCE_MODULES = ["torch", "pydantic", "einops"]


def missing_reference_modules() -> list[str]:
    """The reference's dependencies this Python lacks; none to check when REF_PYTHON names
    another interpreter to run it."""
    if os.environ.get("REF_PYTHON"):
        return []
    return [m for m in REFERENCE_MODULES if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config, items) -> None:
    deselect_other_kernels(config, items)
    if os.environ.get("REF_REPO"):
        missing = missing_reference_modules()
        if missing:
            skip = pytest.mark.skip(reason=f"the reference needs {', '.join(missing)}: "
                                    'pip install -e ".[reference]" (or set REF_PYTHON)')
            for item in items:
                if item.get_closest_marker("reference_checkout"):
                    item.add_marker(skip)
        return
    deselected = [i for i in items if i.get_closest_marker("reference_checkout")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [i for i in items if not i.get_closest_marker("reference_checkout")]
        config.stash[_DESELECTED] = len(deselected)


_DESELECTED = pytest.StashKey[int]()


def pytest_report_header(config) -> str | None:
    if os.environ.get("REF_REPO"):
        return f"REF_REPO={os.environ['REF_REPO']}: the reference's own scripts are run too"
    return ("REF_REPO not set: the tests that run the reference's own scripts are deselected "
            "(set it to a checkout of jhspaybar/TinyRecursiveModels to run them)")


# ----------------------------------------------------------------------------------------------
# Both sets of kernel branches (mlx_trm/kernels.py)

KERNELS = ["metal", "cpu"]


@pytest.fixture(params=KERNELS)
def kernels(request, monkeypatch) -> str:
    """The test runs twice: with ``MLX_TRM_KERNELS=metal`` (Apple silicon's branches: mx.exp
    softmax and SiLU, fused attention for every mask, mx.fast.rms_norm, float16 kept under
    mlx-lm) and with ``=cpu`` (the Linux CPU's), both on this machine. Compiled functions kept
    on a model are keyed by the setting, so neither half reuses the other's trace."""
    monkeypatch.setenv(ENV, request.param)
    return request.param


def deselect_other_kernels(config, items) -> None:
    """Marks the tests that use the ``kernels`` fixture (``pytest -m kernels`` selects them); with
    ``MLX_TRM_KERNELS`` set for the session, only that half of them runs."""
    try:
        chosen = kernels_setting()
    except ConfigError as e:
        raise pytest.UsageError(str(e)) from None
    halves = [i for i in items if "kernels" in getattr(i, "fixturenames", ())]
    for item in halves:
        item.add_marker(pytest.mark.kernels)
    other = {id(i) for i in halves if chosen and i.callspec.params["kernels"] != chosen}
    if other:
        config.hook.pytest_deselected(items=[i for i in items if id(i) in other])
        items[:] = [i for i in items if id(i) not in other]


@pytest.fixture
def tinystories_dir() -> Path:
    return TINYSTORIES


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def save_small_model(directory: Path, seq_len: int) -> Path:
    """A random-init dense TRM + ACT (hidden 16, full 10k vocabulary) saved with the packaged
    tokenizer: a model directory the CLIs can run in seconds."""
    import mlx.core as mx

    from mlx_trm.checkpoint import save
    from mlx_trm.config import ModelConfig
    from mlx_trm.data.tokenizer import load_tokenizer
    from mlx_trm.models import build_model

    mx.random.seed(0)
    model = build_model(ModelConfig(hidden_size=16, num_heads=2, expansion=2, L_layers=2,
                                    L_cycles=2, halt_max_steps=2, seq_len=seq_len))
    return save(directory, model, load_tokenizer())


def model_kinds(moe: dict) -> dict[str, dict]:
    """ModelConfig overrides for the five families, the MoE ones with the expert settings ``moe``:
    flat, dense TRM, dense TRM + ACT, MoEUT, MoEUT + ACT."""
    return {
        "flat": dict(flat_transformer=True, halt_max_steps=1),
        "dense": dict(halt_max_steps=1),
        "dense_act": dict(halt_max_steps=3),
        "moeut": dict(halt_max_steps=1, **moe),
        "moeut_act": dict(halt_max_steps=2, **moe),
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """folder -> its reference step_3.pt converted to a model directory (once per module)."""
    pytest.importorskip("torch", reason="converting the reference checkpoints needs torch")
    from mlx_trm.interop.convert import torch_to_mlx

    root, done = tmp_path_factory.mktemp("converted"), {}

    def convert(folder):
        if folder not in done:
            done[folder] = torch_to_mlx(folder / "step_3.pt", root / str(len(done)))
        return done[folder]
    return convert
