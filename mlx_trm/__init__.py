"""mlx-trm: Tiny Recursive Models for language modelling on Apple MLX.

    import mlx_trm
    model, tokenizer = mlx_trm.load("runs/quickstart")
    print(mlx_trm.generate(model, tokenizer, "Once upon a time", max_tokens=50))
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: str, model_config: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Load a model directory: ``(model, tokenizer)``, as ``mlx_lm.load``.

    ``model_config`` overrides config fields at load time, e.g. ``{"halt_max_steps": 8}``.
    """
    from .checkpoint import load as _load

    return _load(path, model_config)


def save(path: str, model: Any, tokenizer: Any = None) -> Any:
    """Save a model (and tokenizer) as a model directory, atomically."""
    from .checkpoint import save as _save

    return _save(path, model, tokenizer)


def generate(model: Any, tokenizer: Any, prompt: str, **kwargs: Any) -> str:
    """Generate a continuation of ``prompt`` (greedy unless a sampler is given)."""
    from .generate import generate as _generate

    return _generate(model, tokenizer, prompt, **kwargs)


__all__ = ["__version__", "generate", "load", "save"]
