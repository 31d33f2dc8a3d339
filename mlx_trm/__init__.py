"""mlx-trm: Tiny Recursive Models for language modelling on Apple MLX.

    import mlx_trm
    model, tokenizer = mlx_trm.load("runs/quickstart")
    print(mlx_trm.generate(model, tokenizer, "Once upon a time", max_tokens=50))
"""

from __future__ import annotations

__version__ = "0.1.0"

import warnings

# Eager, as mlx-lm does: ``mlx_trm.generate`` is the function, and importing the submodule of
# the same name later does not rebind it. ``python -m mlx_trm.generate`` then finds the module
# already imported, which is harmless here (it only defines functions), so runpy's warning about
# it is silenced.
warnings.filterwarnings("ignore", message="'mlx_trm\\.generate' found in sys.modules",
                        category=RuntimeWarning)
from .checkpoint import load, save  # noqa: E402
from .generate import generate, stream_generate  # noqa: E402

__all__ = ["__version__", "generate", "load", "save", "stream_generate"]
