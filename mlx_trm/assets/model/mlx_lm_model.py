"""mlx-lm entry point of an mlx-trm model directory (config.json names it as ``model_file``).

``mlx_lm.generate/chat/server --model DIR --trust-remote-code`` run this file. It only imports the
architecture and the tokenizer class (tokenizer_config.json's ``auto_map``) from the installed
``mlx_trm`` package; see mlx_trm/interop/ and mlx_trm/story_tokenizer.py there.
"""

import importlib.util

if importlib.util.find_spec("mlx_trm") is None:
    raise ImportError(
        "this model directory was written by mlx-trm, and mlx-lm needs the mlx_trm package to "
        "build it: install it into the same environment (pip install -e /path/to/mlx-trm)"
    )

from mlx_trm.interop import Model, ModelArgs  # noqa: E402,F401
from mlx_trm.story_tokenizer import StoryTokenizer  # noqa: E402,F401
