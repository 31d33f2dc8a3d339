"""mlx-lm interop: every model directory is also an mlx-lm model.

    mlx_lm.generate --model runs/quickstart/model --trust-remote-code --prompt "Once upon a time"
    mlx_lm.server --model runs/quickstart/model --trust-remote-code --port 8080

mlx-lm (0.32) builds a custom architecture when ``config.json`` names a ``model_file`` and the
user passes ``--trust-remote-code``: it imports ``Model`` and ``ModelArgs`` from that file, calls
``ModelArgs.from_dict(config)``, ``Model(args)``, loads ``model*.safetensors`` and builds the cache
with ``model.make_cache()``. The tokenizer comes from transformers' ``AutoTokenizer``. So a
directory needs, next to our own files (written with it: ``mlx_trm.checkpoint.mlx_lm_files``):

- ``mlx_lm_model.py``: two imports from ``mlx_trm.interop``; the code stays in the installed
  package;
- ``config.json`` + ``model_file`` and ``eos_token_id`` (0, ``<|endoftext|>``);
- ``tokenizer.json`` + ``tokenizer_config.json``: our SentencePiece BPE rebuilt with the
  ``tokenizers`` library (same ids, same text; see ``mlx_lm_files.hf_tokenizer``).

The cache is one stock ``mlx_lm.models.cache.KVCache`` per layer application (generation/cache.py
says why that is exact), so mlx-lm's batched generation (``batch_generate``, the server's
continuous batching, ``mlx_lm.benchmark -b N``), prompt-cache files, the server's prompt-cache
trimming and ``--kv-bits`` work unchanged. A one-token forward over those slots runs our compiled
decode step (:func:`decode_into_mlx_lm_cache`). mlx-lm ignores ``--max-kv-size`` for every model
that makes its own cache (``make_prompt_cache`` does not pass the size on), so ours keep every key
of every layer application, and the output is the exact one.
Directories with the gpt-neo-10k tokenizer (or
none) get ``mlx_lm_unsupported`` in config.json, and loading them in mlx-lm stops with that reason.

Existing directories (saved before this module) are upgraded in place with
``python -m mlx_trm.cli.interop DIR``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as lm_cache

from ..checkpoint.mlx_lm_files import UNSUPPORTED_KEY
from ..config import ModelConfig, model_config_from_dict
from ..generation.decoders import WINDOW_BLOCK, compiled_decode_step, round_up
from ..kernels import metal_kernels
from ..models.trm import Model as TRMModel

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

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """The model's forward; one new position over mlx-lm's own cache slots takes the
        compiled decode step of our decoders (mlx-lm would otherwise run it eagerly, dispatching
        every operation of every layer application from Python)."""
        if inputs.shape[1] == 1 and cache is not None and write_column(cache) is not None:
            return decode_into_mlx_lm_cache(self, inputs, cache)
        return super().__call__(inputs, cache)


# ----------------------------------------------------------------------------------------------
# The compiled decode step on mlx-lm's slots, through their public API only
#
# ``KVCache``: the public attributes ``keys``, ``values`` (buffers a block longer than what is
# written), ``offset`` (columns written) and ``step`` (its growth block). ``BatchKVCache``: its
# ``state`` property, (keys, values, offset [B], left_padding [B], write column), which it also
# takes back. tests/test_mlx_lm_batch.py fails by name if an mlx-lm upgrade changes either.


def _batch_state(slot: Any) -> tuple | None:
    state = slot.state
    return state if isinstance(state, tuple) and len(state) == 5 else None


def write_column(cache: list) -> int | None:
    """The buffer column every slot writes next, or None where the compiled step cannot take the
    cache: only stock ``KVCache`` slots (``mlx_lm.generate``) or ``BatchKVCache`` slots (its
    batched generation and the server) holding keys, all of one type, column and capacity;
    never quantized (``--kv-bits``) or rotating ones."""
    first = cache[0]
    kind = type(first)
    if kind not in (lm_cache.KVCache, lm_cache.BatchKVCache) or first.keys is None:
        return None
    if kind is lm_cache.KVCache:
        columns = [c.offset for c in cache if type(c) is kind and c.keys is not None]
    else:
        columns = [s[4] for c in cache if type(c) is kind and (s := _batch_state(c))]
    if len(columns) != len(cache) or any(col != columns[0] for col in columns):
        return None
    if any(c.keys.shape[2] != first.keys.shape[2] for c in cache):
        return None
    return columns[0]


def decode_into_mlx_lm_cache(model: TRMModel, tokens: mx.array, cache: list) -> mx.array:
    """One new position [B, 1] through every slot of a stock mlx-lm cache: logits [B, 1, V].

    The compiled step runs on the slots' own buffers (columns past the write column are masked;
    a ``BatchKVCache``'s left padding is masked as its own mask does), then each slot takes the
    new buffers and moves on by one, exactly as ``update_and_fetch`` would have left it.
    """
    column = write_column(cache)
    first = cache[0]
    capacity = first.keys.shape[2]
    batched = type(first) is lm_cache.BatchKVCache
    keys, values = [c.keys for c in cache], [c.values for c in cache]
    if column + 1 > capacity:  # full: grow every slot by mlx-lm's own block
        grow = [(0, 0), (0, 0), (0, first.step), (0, 0)]
        keys = [mx.pad(k[..., :column, :], grow) for k in keys]
        values = [mx.pad(v[..., :column, :], grow) for v in values]
    B = tokens.shape[0]
    left_padding = (first.left_padding.astype(mx.int32) if batched
                    else mx.zeros((B,), dtype=mx.int32))
    window = min(round_up(column + 1, WINDOW_BLOCK), keys[0].shape[2])
    logits, keys, values = compiled_decode_step(model)(
        tokens[:, 0], mx.array(column, dtype=mx.int32), left_padding, keys, values, window)
    for c, k, v in zip(cache, keys, values):
        if batched:
            _, _, offset, padding, _ = c.state
            c.state = (k, v, offset + 1, padding, column + 1)
        else:
            c.keys, c.values, c.offset = k, v, c.offset + 1
    return logits


class _TrmConfigWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "model of type `trm`" not in record.getMessage()


def _quiet_transformers_config_warning() -> None:
    """transformers' AutoTokenizer reads config.json, does not know ``model_type: trm`` and warns
    that it builds a generic config. Harmless for a tokenizer; drop only that message."""
    logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _TrmConfigWarningFilter) for f in logger.filters):
        logger.addFilter(_TrmConfigWarningFilter())
