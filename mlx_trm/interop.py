"""mlx-lm interop: every model directory is also an mlx-lm model.

    mlx_lm.generate --model runs/quickstart/model --trust-remote-code --prompt "Once upon a time"
    mlx_lm.server --model runs/quickstart/model --trust-remote-code --port 8080

mlx-lm (0.32) builds a custom architecture when ``config.json`` names a ``model_file`` and the
user passes ``--trust-remote-code``: it imports ``Model`` and ``ModelArgs`` from that file, calls
``ModelArgs.from_dict(config)``, ``Model(args)``, loads ``model*.safetensors`` and builds the cache
with ``model.make_cache()``. The tokenizer comes from transformers' ``AutoTokenizer``. So a
directory needs, next to our own files (:func:`write_mlx_lm_files`):

- ``mlx_lm_model.py``: two imports from this module; the code stays in the installed package;
- ``config.json`` + ``model_file`` and ``eos_token_id`` (0, ``<|endoftext|>``);
- ``tokenizer.json`` + ``tokenizer_config.json``: our SentencePiece BPE rebuilt with the
  ``tokenizers`` library (same ids, same text; see :func:`hf_tokenizer`).

The cache is one stock ``mlx_lm.models.cache.KVCache`` per layer application (models/cache.py
says why that is exact), so mlx-lm's batched generation (``batch_generate``, the server's
continuous batching, ``mlx_lm.benchmark -b N``), prompt-cache files, the server's prompt-cache
trimming and ``--kv-bits`` work unchanged; ``--max-kv-size`` is refused (:meth:`Model.make_cache`).
Directories with the gpt-neo-10k tokenizer (or
none) get ``mlx_lm_unsupported`` in config.json, and loading them in mlx-lm stops with that reason.

Existing directories (saved before this module) are upgraded in place with
``python -m mlx_trm.interop DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from typing import Any

import mlx.core as mx

from .checkpoint import load_dir_tokenizer, read_model_config, resolve_model_dir
from .config import ConfigError, ModelConfig, cli_errors, model_config_from_dict
from .kernels import metal_kernels
from .mlx_lm_files import (  # noqa: F401  (the writer's home is mlx_trm.mlx_lm_files)
    CHAT_TEMPLATE,
    MODEL_FILE,
    MODEL_FILE_SOURCE,
    UNSUPPORTED_KEY,
    hf_tokenizer,
    hf_tokenizer_config,
    write_mlx_lm_files,
)
from .models.trm import Model as TRMModel

# ----------------------------------------------------------------------------------------------
# The architecture as mlx-lm sees it


class ModelArgs(ModelConfig):
    """``ModelConfig`` built from config.json, ignoring mlx-lm's keys (``model_file``, ...)."""

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelArgs:
        if reason := params.get(UNSUPPORTED_KEY):
            raise ValueError(f"this mlx-trm model directory cannot be served by mlx-lm: {reason}")
        _quiet_transformers_config_warning()
        return cls(**asdict(model_config_from_dict(params, strict=False)))


class Model(TRMModel):
    """Our model unchanged (same parameter names, so mlx-lm loads model.safetensors as is)."""

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """On MLX's CPU backend float16 weights (the shipped demo's) are computed in float32,
        as ``mlx_trm.load`` does: the CPU has no BLAS path for float16 matmuls (the demo decoded
        at 217 tok/s in float16 against 491 in float32 under ``generate_step``). On the GPU
        (or with ``MLX_TRM_KERNELS=metal``) the stored dtype is kept."""
        weights = super().sanitize(weights)
        if metal_kernels():
            return weights
        return {k: v.astype(mx.float32) if v.dtype in (mx.float16, mx.bfloat16) else v
                for k, v in weights.items()}

    def make_cache(self) -> list:
        """One stock mlx-lm ``KVCache`` per layer application; refuses ``--max-kv-size``.

        mlx-lm's ``make_prompt_cache(model, max_kv_size)`` calls ``model.make_cache()`` without
        passing the size on, so the option would be accepted and then ignored. A rotating window
        per slot would change what the recursion computes (every stage would see only the last
        window of each latent), so the size is read from that caller and refused before any
        token is generated.
        """
        caller = sys._getframe(1)
        if (caller.f_code.co_name == "make_prompt_cache"
                and caller.f_locals.get("max_kv_size") is not None):
            raise ValueError("mlx-trm models do not support --max-kv-size (max_kv_size): their "
                             "recursion needs every key of every layer application; run "
                             "without it")
        return super().make_cache()


class _TrmConfigWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "model of type `trm`" not in record.getMessage()


def _quiet_transformers_config_warning() -> None:
    """transformers' AutoTokenizer reads config.json, does not know ``model_type: trm`` and warns
    that it builds a generic config. Harmless for a tokenizer; drop only that message."""
    logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _TrmConfigWarningFilter) for f in logger.filters):
        logger.addFilter(_TrmConfigWarningFilter())


@cli_errors
def main(argv: list[str] | None = None) -> None:
    """``python -m mlx_trm.interop DIR``: add the mlx-lm files to an existing model directory."""
    parser = argparse.ArgumentParser(
        prog="python -m mlx_trm.interop",
        description="Make an mlx-trm model directory loadable by mlx-lm (--trust-remote-code).")
    parser.add_argument("model", help="model directory (or a training run directory)")
    args = parser.parse_args(argv)
    path = resolve_model_dir(args.model)
    _, raw = read_model_config(path)
    write_mlx_lm_files(path, raw, load_dir_tokenizer(path))
    if reason := json.loads((path / "config.json").read_text()).get(UNSUPPORTED_KEY):
        raise ConfigError(f"{path}: mlx-lm cannot serve it: {reason}")
    print(f"{path}: mlx-lm files written; try: mlx_lm.generate --model {path} "
          '--trust-remote-code --prompt "Once upon a time"')


if __name__ == "__main__":
    main(sys.argv[1:])
