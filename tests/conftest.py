"""Shared test helpers: where ../shared lives, and small model configs."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TINYSTORIES = SHARED / "data" / "tinystories"
FIXTURES = SHARED / "fixtures" / "seed_checkpoints"
CONFIGS = ROOT / "configs"


@pytest.fixture
def tinystories_dir() -> Path:
    if not TINYSTORIES.is_dir():
        pytest.skip(f"the TinyStories sample is not at {TINYSTORIES} (../shared next to the repo)")
    return TINYSTORIES


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"the reference fixtures are not at {FIXTURES} (../shared next to the repo)")
    return FIXTURES


def save_small_model(directory: Path, seq_len: int) -> Path:
    """A random-init dense TRM + ACT (hidden 16, full 10k vocabulary) saved with the packaged
    tokenizer: a model directory the CLIs can run in seconds."""
    import mlx.core as mx

    from mlx_trm.checkpoint import save
    from mlx_trm.config import ModelConfig
    from mlx_trm.models import build_model
    from mlx_trm.tokenizer import load_tokenizer

    mx.random.seed(0)
    model = build_model(ModelConfig(hidden_size=16, num_heads=2, expansion=2, L_layers=2,
                                    L_cycles=2, halt_max_steps=2, seq_len=seq_len))
    return save(directory, model, load_tokenizer())
