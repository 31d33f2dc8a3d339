"""mlx-trm: Tiny Recursive Models for language modelling on Apple MLX.

    import mlx_trm
    model, tokenizer = mlx_trm.load("runs/quickstart")
    print(mlx_trm.generate(model, tokenizer, "Once upon a time", max_tokens=50))

The package, by concept (dependencies point down this list):

- ``cli/``: the commands (``mlx_trm.train``, ``.evaluate``, ``.generate``, ``.chat``, ``.convert``);
- ``training/``: the step, the loop, the run directory, memory fitting, evaluation;
- ``generation/``: the recursion-aware KV cache, the decoders, sampling, ``generate``;
- ``interop/``: mlx-lm's view of a model directory, the reference's PyTorch checkpoints;
- ``checkpoint/``: model directories (``load``, ``save``, the files mlx-lm reads);
- ``data/``: story sources, tokenizers, batches;
- ``models/``: the recursive model and its layers;
- ``config.py``, ``kernels.py``, ``blas.py``, ``files.py``: settings and the machine.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Loaded on first use (PEP 562): importing mlx_trm, or running a command's --help, does not pull
# in mlx, mlx-lm and transformers (seconds of start-up).
_API = {"load": "checkpoint", "save": "checkpoint", "generate": "generation.generate",
        "stream_generate": "generation.generate", "batch_generate": "generation.generate"}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'mlx_trm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
