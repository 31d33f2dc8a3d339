"""Other tools' formats: mlx-lm and PyTorch.

- ``model.py``: the mlx-lm architecture every model directory names in its ``mlx_lm_model.py``
  (``from mlx_trm.interop import Model, ModelArgs``: a stable path, directories written by any
  version import it), and the compiled decode step over mlx-lm's own cache;
- ``convert.py``: the reference's PyTorch checkpoints to model directories and back.

What a model directory holds for mlx-lm (``mlx_lm_model.py``, the ``tokenizers`` files) is
written with the directory itself: ``mlx_trm.checkpoint.mlx_lm_files``.
"""

from .model import Model, ModelArgs

__all__ = ["Model", "ModelArgs"]
