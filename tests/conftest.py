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
