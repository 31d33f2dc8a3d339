"""Quantized model directories, as ``mlx_lm.convert -q`` writes them.

    mlx_lm.convert --model DIR --trust-remote-code -q --q-bits 4 --mlx-path OUT
    mlx_trm.generate --model OUT --prompt "Once upon a time"

mlx-lm quantizes every module that has ``to_quantized``: the dense projections (``nn.Linear``),
the tied embedding (``TiedEmbedding`` -> ``nn.QuantizedEmbedding``: dequantized rows for the
lookup, ``mx.quantized_matmul`` for the read-out) and the MoE experts (``SwitchLinear`` ->
mlx-lm's ``QuantizedSwitchLinear``, ``mx.gather_qmm``). The routers stay in float, so that
quantization error never changes which experts a token takes for want of precision in the
selector. config.json records the settings under ``"quantization"``; loading rebuilds the same
quantized skeleton before reading the weights, as ``mlx_lm.utils.load_model`` does.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import infer_quant_config


def quantize_skeleton(model: nn.Module, config: dict[str, Any],
                      weights: dict[str, mx.array]) -> None:
    """Quantize ``model`` in place the way the saved ``weights`` were (no-op when not quantized).

    A module is quantized when config.json's ``"quantization"`` names its path (per-layer
    settings) or when the weights hold ``PATH.scales``; its bits and group size are read from the
    packed shapes (mlx-lm's ``infer_quant_config``), so mixed-precision recipes load too.
    """
    quantization = config.get("quantization")
    if not quantization:
        return
    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(model, group_size=quantization.get("group_size"), bits=quantization.get("bits"),
                mode=quantization.get("mode", "affine"), class_predicate=predicate)
