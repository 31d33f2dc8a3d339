"""What a generation reports: mlx-lm's statistics (tokens, tokens-per-sec, peak memory) and the
lines adaptive halting and speculative decoding add after them."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .speculative import Speculation


@dataclass
class GenerationResponse:
    """One streamed piece, with mlx-lm's statistics."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop" (end-of-story) or "length" on the last response


@dataclass
class BatchStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    prompt_time: float = 0.0
    generation_time: float = 0.0


def print_stats(r: GenerationResponse | BatchStats, file: Any = None) -> None:
    """mlx-lm's statistics block."""
    file = file or sys.stdout
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec",
          file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


def decoding_lines(halt_policy: Any = None, speculation: Speculation | None = None) -> list[str]:
    """The statistics lines of adaptive halting and speculative decoding, after mlx-lm's."""
    lines = []
    if halt_policy is not None:
        lines.append(f"ACT steps per token: {halt_policy.steps_per_token:.2f}")
    return lines + ([speculation.line()] if speculation is not None else [])
