"""Quantized models: mlx_lm.convert -q on our directories, loaded by mlx_trm.load and mlx-lm;
the MoE experts' gather_qmm path against dequantize-then-dense."""

from __future__ import annotations

import importlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_trm
from mlx_trm.checkpoint import save
from mlx_trm.config import ModelConfig
from mlx_trm.data.tokenizer import load_tokenizer
from mlx_trm.models import build_model
from mlx_trm.models.layers import rms_norm
from mlx_trm.models.moe import SigmaMoE, SwitchHead
from mlx_trm.models.router import Router
from tests.moe_reference import sigma_moe_dense, switch_head_dense

GROUP = 32  # the tiny models are 32 wide; mlx-lm's default group (64) needs 64
FAMILIES = {
    "flat": dict(flat_transformer=True, L_layers=2),
    "trm": dict(L_layers=1, L_cycles=2, H_cycles=2),
    "moeut": dict(use_moeut=True, L_layers=1, L_cycles=2, moe_ff_n_experts=4,
                  moe_ff_expert_size=32, moe_att_n_experts=2),
}
PROMPT = "Once upon a time, there was a little girl named Lily. She"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each family saved in float32, then through mlx_lm.convert at 8 and 4 bits."""
    convert = importlib.import_module("mlx_lm.convert").convert
    root = tmp_path_factory.mktemp("quantized")
    dirs = {}
    for family, overrides in FAMILIES.items():
        mx.random.seed(0)
        model = build_model(ModelConfig(hidden_size=32, num_heads=1, expansion=2, seq_len=64,
                                        **overrides))
        dirs[family] = save(root / family, model, load_tokenizer())
        for bits in (8, 4):
            out = root / f"{family}_q{bits}"
            convert(str(dirs[family]), str(out), quantize=True, q_group_size=GROUP, q_bits=bits,
                    trust_remote_code=True)
            dirs[f"{family}_q{bits}"] = out
    return dirs


def logits(model: nn.Module, tokenizer) -> np.ndarray:
    return np.array(model(mx.array([tokenizer.encode(PROMPT)])).astype(mx.float32))


def submodule(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = model[int(part)] if isinstance(model, list) else model[part]
    return model


def with_dequantized_weights(float_model: nn.Module, quantized: nn.Module) -> nn.Module:
    """``float_model`` with every quantized matrix of ``quantized`` put back as its dequantized
    float values (same modules, same code path as before quantization)."""
    for path, module in quantized.named_modules():
        if hasattr(module, "scales"):
            w = mx.dequantize(module.weight, module.scales, module.get("biases"),
                              group_size=module.group_size, bits=module.bits)
            target = submodule(float_model, path)
            name = "embedding_weight" if path == "embed_tokens" else "weight"
            target.update({name: w})
    return float_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_directory_loads_quantized_and_runs(model_dirs, family):
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    reference, tokenizer = mlx_trm.load(str(model_dirs[family]))
    ref = logits(reference, tokenizer)
    errors = {}
    for bits in (8, 4):
        model, tok = mlx_trm.load(str(model_dirs[f"{family}_q{bits}"]))
        assert tok.name == tokenizer.name  # the SentencePiece model behind tokenizer.json
        assert isinstance(model.embed_tokens, nn.QuantizedEmbedding)
        assert model.embed_tokens.bits == bits
        kinds = {type(m) for _, m in model.named_modules()}
        assert nn.Linear not in kinds and nn.QuantizedLinear in kinds
        if family == "moeut":
            layer = model.L_level.layers[0]
            for experts in (layer.mlp["keys"], layer.mlp["values"], layer.self_attn.v,
                            layer.self_attn.o):
                assert isinstance(experts, QuantizedSwitchLinear) and experts.bits == bits
            assert isinstance(layer.mlp.router, Router)  # routers stay in float
        out = logits(model, tok)
        # Exactly the float model carrying the dequantized weights: the quantized layers
        # compute what they stand for, and loading put every array where it belongs.
        float_model, _ = mlx_trm.load(str(model_dirs[family]))
        np.testing.assert_allclose(out, logits(with_dequantized_weights(float_model, model), tok),
                                   atol=2e-4 * np.abs(out).max())
        # Close to the float model: per position, relative to the logits' scale. The median,
        # because in a random-init MoE a rounding can flip a near-tied expert choice, which moves
        # that position (and, through attention, later ones) by far more.
        per_position = np.abs(out - ref).max(-1) / np.abs(ref).max()
        errors[bits] = float(np.median(per_position) if family == "moeut" else per_position.max())
        text = mlx_trm.generate(model, tok, PROMPT, max_tokens=6)
        assert isinstance(text, str) and text
    assert errors[8] < (0.1 if family == "moeut" else 0.03), errors
    assert errors[4] < 0.3, errors
    assert errors[8] < errors[4]


def test_mlx_lm_loads_the_quantized_directory(model_dirs):
    """mlx-lm's own loader builds the same quantized model (same logits as mlx_trm.load)."""
    from mlx_lm.utils import load as mlx_lm_load

    path = str(model_dirs["moeut_q4"])
    ours, tokenizer = mlx_trm.load(path)
    # mlx_lm.convert saves the tokenizer as its class, StoryTokenizer: the tokenizer needs the
    # same trust as the model (mlx-lm's CLIs pass --trust-remote-code to both)
    theirs, _ = mlx_lm_load(path, tokenizer_config={"trust_remote_code": True},
                            trust_remote_code=True)
    np.testing.assert_array_equal(logits(theirs, tokenizer), logits(ours, tokenizer))


def dequantized(layer: nn.Module) -> dict[str, mx.array]:
    return {"weight": mx.dequantize(layer.weight, layer.scales, layer.get("biases"),
                                    group_size=layer.group_size, bits=layer.bits)}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_equal_dequantize_then_dense(bits):
    """gather_qmm experts == the dense all-experts oracle on the dequantized weights."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    D = 64
    for make, quantized_paths, run_q, run_dense in (
        (lambda: SigmaMoE(D, 8, 64, 2, init_scale=1.0), {"keys", "values"},
         lambda m, x: m(x, rms_norm(x)),
         lambda m, x: sigma_moe_dense(m, x, rms_norm(x))),
        (lambda: SwitchHead(D, 2, 4, 2, init_scale=1.0), {"q", "k", "v", "o"},
         lambda m, x: m(rms_norm(x), x),
         lambda m, x: switch_head_dense(m, rms_norm(x), x)),
    ):
        layers = []
        for _ in range(3):  # the same initial weights three times
            mx.random.seed(bits)
            layers.append(make())
        quantized, dense, original = layers
        nn.quantize(quantized, group_size=GROUP, bits=bits)
        found = set()
        for path, module in quantized.named_modules():
            if isinstance(module, (nn.QuantizedLinear, QuantizedSwitchLinear)):
                dense[path].update(dequantized(module))  # the routers stay float in both
                found.add(path)
        assert found == quantized_paths
        x = mx.random.normal((2, 24, D))
        out_q, out_d = np.array(run_q(quantized, x)), np.array(run_dense(dense, x))
        assert np.abs(out_q - out_d).max() <= 1e-5 * max(1.0, np.abs(out_d).max())
        # Quantization did change the layer: this is not a float-vs-float comparison.
        assert np.abs(out_q - np.array(run_dense(original, x))).max() > 1e-4
