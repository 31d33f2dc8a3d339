"""Convert between the reference's PyTorch checkpoints and mlx-trm model directories.

    torch_to_mlx("runs/.../step_N.pt", OUT_DIR, tokenizer=None)  # mlx_trm.convert --torch-to-mlx
    mlx_to_torch(MODEL_DIR, "OUT.pt")                              # mlx_trm.convert --mlx-to-torch

A reference checkpoint is ``{"model_state_dict", "config", "step", "sequences_consumed"}``, as
its ``pretrain_text.save_checkpoint`` writes it: parameter keys under ``model.inner.`` (the loss
head wraps the ACT wrapper, which wraps the inner model) and ``config`` = the reference's whole
``PretrainConfig.model_dump()`` with the model's fields under ``config["arch"]``. Our parameter
names are the reference's without that prefix, except in the MoE layers (experts as
``SwitchLinear`` modules stored [E, out, in], buffers owned by the routers:
``models.moe.REFERENCE_NAMES`` maps them, the model's ``sanitize`` reads either); the tied
``lm_head.weight`` duplicate exists only on the torch side, and old flat checkpoints named their
layers ``L_level.layers.*`` instead of ``flat_layers.*``.

What ``--mlx-to-torch`` writes loads in the reference's own ``generate_stories.py`` and
``sweep_generation.py`` loaders and validates as its ``PretrainConfig`` (``pretrain_text.py``):

- ``config["arch"]`` holds every model field the reference reads, ``rope_theta`` and
  ``rms_norm_eps`` included, and no ``causal`` (its loaders pass ``causal=True`` themselves; a
  ``causal: false`` model is refused, the reference cannot run one);
- ``config["tokenizer_name"]`` is ``gpt-neo-10k`` for that tokenizer; for a SentencePiece model
  it is ``mlx-trm-sentencepiece:<OUT>.tokenizer.model``, the model file written beside the
  checkpoint. The reference knows only t5-small / gpt-neo-125M / gpt-neo-10k, so its scripts
  stop at that name with ``Unknown tokenizer '...'`` instead of decoding with the wrong one;
  to use them, give its ``get_tokenizer_for_dataset`` a SentencePiece tokenizer of that file.
  A model with no tokenizer gets ``mlx-trm:no-tokenizer`` (it stops there the same way);
- ``step`` / ``sequences_consumed`` are the run's (``train_state/``, or the packaged demo's
  ``provenance.json``), the training fields (batch, lr, schedule, seed) the run's config.
  (The reference's ``load_checkpoint=`` option reads a bare state dict, not this file: pass it
  ``checkpoint["model_state_dict"]`` saved on its own.)
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..checkpoint import (
    load,
    load_weights_strict,
    model_weights,
    read_model_config,
    resolve_model_dir,
    save,
)
from ..config import ConfigError, ModelConfig, TrainConfig, model_config_from_dict
from ..data.tokenizer import GPTNeo10kTokenizer, SentencePieceTokenizer, load_tokenizer
from ..models import build_model
from ..models.moe import to_reference_names

PREFIX = "model.inner."
REFERENCE_ARCH = "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"
REFERENCE_LOSS = {"name": "losses@ACTLossHead", "loss_type": "softmax_cross_entropy"}
# The reference model config's fields (TinyRecursiveReasoningModel_ACTV1Config, commit e2c9dc7),
# less the ones its loaders fill in (batch_size, vocab_size, seq_len, num_puzzle_identifiers).
REFERENCE_ARCH_FIELDS = frozenset(
    "puzzle_emb_ndim H_cycles L_cycles H_layers L_layers hidden_size expansion num_heads "
    "pos_encodings rms_norm_eps rope_theta halt_max_steps halt_exploration_prob forward_dtype "
    "mlp_t puzzle_emb_len no_ACT_continue causal tie_word_embeddings use_moeut moe_ff_n_experts "
    "moe_ff_expert_size moe_ff_k moe_att_n_experts moe_att_k moe_expert_dropout "
    "moe_entropy_reg moe_att_entropy_reg moe_balance_coef moe_bias_balancing "
    "moe_bias_update_rate moe_bias_momentum moe_bias_clip flat_transformer".split())
GPT_NEO_10K = "gpt-neo-10k"
SPM_MARKER = "mlx-trm-sentencepiece:"  # + the tokenizer.model file written beside the .pt
NO_TOKENIZER = "mlx-trm:no-tokenizer"
TOKENIZER_HINT = "pass --tokenizer PATH (a tokenizer.json / tokenizer.model, or gpt-neo-10k)"


def _torch():
    try:
        import torch
    except ImportError:
        raise ConfigError("the converter needs PyTorch: pip install 'mlx-trm[torch]' "
                          "(or pip install torch)") from None
    return torch


def read_torch_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a reference checkpoint dict (tensors stay torch tensors)."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found; pass the step_N.pt written by the "
                          "reference trainer")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise ConfigError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}); pass the "
                          "step_N.pt written by the reference trainer") from None
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a reference checkpoint: expected a dict with "
                          "'model_state_dict' and 'config'")
    return checkpoint


def arch_from_checkpoint(checkpoint: dict[str, Any], state: dict[str, Any]) -> ModelConfig:
    """The ModelConfig described by a checkpoint's config (nested ``arch`` dict or flat keys)."""
    config = checkpoint.get("config") or {}
    arch = config.get("arch", config)
    if not isinstance(arch, dict) or not arch:
        raise ConfigError("the checkpoint has no 'config' with the model architecture; "
                          "it was not written by the reference trainer")
    name = arch.get("name", REFERENCE_ARCH)
    if name != REFERENCE_ARCH:
        raise ConfigError(f"unknown architecture {name!r}: only {REFERENCE_ARCH} (the reference's "
                          "text model) converts")
    known = set(ModelConfig.__dataclass_fields__)
    values = {k: v for k, v in arch.items() if k in known and k != "name"}
    embedding = state.get("embed_tokens.embedding_weight")
    if embedding is not None:
        values["vocab_size"] = int(embedding.shape[0])
    if "seq_len" in config:
        values["seq_len"] = int(config["seq_len"])
    run = str(config.get("checkpoint_path") or "")
    values["name"] = next((p for p in Path(run).parts if p.startswith("trm_")), "trm")
    model_config = model_config_from_dict(values)
    model_config.validate()
    return model_config


def strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``model.inner.X`` -> ``X`` (keys without the prefix are kept as they are)."""
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in state_dict.items()}


def torch_state_to_mlx(state: dict[str, Any], flat: bool) -> dict[str, mx.array]:
    """Stripped reference state dict -> our weights (old flat names renamed, tied copy dropped)."""
    state = dict(state)  # the caller's dict stays as it was
    if flat and not any(k.startswith("flat_layers.") for k in state):
        state = {k.replace("L_level.layers.", "flat_layers.", 1): v for k, v in state.items()}
    head = state.pop("lm_head.weight", None)
    embedding = state.get("embed_tokens.embedding_weight")
    if head is not None and embedding is not None and not bool((head == embedding).all()):
        raise ConfigError("lm_head.weight differs from the embedding: only tied "
                          "(tie_word_embeddings: true) checkpoints are supported")
    return {k: mx.array(v.detach().cpu().float().numpy()) for k, v in state.items()}


def torch_to_mlx(checkpoint_path: str | Path, out_dir: str | Path,
                 tokenizer: str | None = None) -> Path:
    """Convert a reference ``step_N.pt`` into a model directory."""
    checkpoint = read_torch_checkpoint(checkpoint_path)
    raw_state = checkpoint["model_state_dict"]
    stripped = strip_prefix(raw_state)
    config = arch_from_checkpoint(checkpoint, stripped)
    model = build_model(config)
    load_weights_strict(model, torch_state_to_mlx(stripped, config.flat_transformer),
                        str(checkpoint_path))
    tok = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    reference = {
        "config": json.loads(json.dumps(checkpoint.get("config", {}), default=str)),
        "step": int(checkpoint.get("step", 0)),
        "sequences_consumed": int(checkpoint.get("sequences_consumed", 0)),
        "state_dict_keys": list(raw_state),
    }
    return save(out_dir, model, tok, extra_config={"reference": reference})


def mlx_to_torch_state(model_dir: str | Path, tokenizer_name: str = NO_TOKENIZER
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A model directory as ``(state_dict, checkpoint_extras)`` in the reference's format."""
    torch = _torch()
    model_dir = resolve_model_dir(model_dir)  # a run directory holds its model in model/
    _, raw_config = read_model_config(model_dir)
    model, _ = load(model_dir)
    weights = {k: np.array(v) for k, v in to_reference_names(model_weights(model)).items()}
    weights["lm_head.weight"] = weights["embed_tokens.embedding_weight"]
    names = {f"{PREFIX}{k}": v for k, v in weights.items()}
    reference = raw_config.get("reference") or {}
    # Keep the reference's key order where we know it (a converted checkpoint), else ours.
    order = [k for k in reference.get("state_dict_keys", []) if k in names]
    order += [k for k in _reference_key_order(names) if k not in order]
    state = {k: torch.from_numpy(names[k].copy()) for k in order}  # copy keeps 0-d shapes
    # the tied head is the same tensor as the embedding, as in the reference
    state[f"{PREFIX}lm_head.weight"] = state[f"{PREFIX}embed_tokens.embedding_weight"]
    training, step, sequences = _training_record(model_dir)
    config = reference.get("config")
    if config and tokenizer_name != NO_TOKENIZER:  # a tokenizer stored since: it is the one
        config = {**config, "tokenizer_name": tokenizer_name}
    extras = {
        "config": config or _reference_config(model.args, tokenizer_name, training),
        "step": step if step is not None else reference.get("step", 0),
        "sequences_consumed": (sequences if sequences is not None
                               else reference.get("sequences_consumed", 0)),
    }
    return state, extras


def _training_record(model_dir: Path) -> tuple[dict[str, Any] | None, int | None, int | None]:
    """(training config, step, sequences) of the run that wrote ``model_dir``: its
    ``train_state/state.json`` (a run's checkpoint), else ``provenance.json`` (the packaged demo),
    else nothing known."""
    state_file = model_dir / "train_state" / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        return state.get("config"), state.get("step"), state.get("sequences_seen")
    provenance = model_dir / "provenance.json"
    if provenance.is_file():
        record = json.loads(provenance.read_text())
        last = record.get("last_evaluation") or {}
        return (record.get("training_config"), record.get("step", last.get("step")),
                record.get("sequences", last.get("sequences")))
    return None, None, None


def _reference_key_order(names: dict[str, Any]) -> list[str]:
    """The reference's order: top-level buffers/params first, then each layer's in turn."""
    head = [f"{PREFIX}{k}" for k in ("H_init", "L_init", "embed_tokens.embedding_weight",
                                     "lm_head.weight", "q_head.weight", "q_head.bias")]
    rest = sorted((k for k in names if k not in head), key=_layer_sort_key)
    return [k for k in head if k in names] + rest


LAYER_KEY_ORDER = [
    "self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
    "self_attn.v", "self_attn.o", "self_attn.sel_v", "self_attn.sel_o", "self_attn.route_scale",
    "self_attn.expert_v_bias", "self_attn.expert_o_bias", "self_attn.expert_v_token_count",
    "self_attn.expert_o_token_count", "self_attn.expert_v_running_load",
    "self_attn.expert_o_running_load", "self_attn.sel_v_target_std", "self_attn.sel_o_target_std",
    "self_attn.q.weight", "self_attn.k.weight", "mlp.keys", "mlp.values", "mlp.expert_sel",
    "mlp.route_scale", "mlp.expert_bias", "mlp.expert_token_count", "mlp.expert_running_load",
    "mlp.selector_target_std",
]


def _layer_sort_key(key: str) -> tuple:
    # "model.inner.L_level.layers.3.mlp.keys" -> (3, rank of "mlp.keys")
    parts = key.split(".")
    i = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if i is None:
        return -1, 0, key
    suffix = ".".join(parts[i + 1:])
    rank = LAYER_KEY_ORDER.index(suffix) if suffix in LAYER_KEY_ORDER else len(LAYER_KEY_ORDER)
    return int(parts[i]), rank, key


def _reference_config(args: ModelConfig, tokenizer_name: str,
                      training: dict[str, Any] | None) -> dict[str, Any]:
    """A ``PretrainConfig.model_dump()`` for the model: every arch field written out (the
    reference's defaults differ from ours, e.g. ``forward_dtype``, ``puzzle_emb_len``), the
    training fields from the run's config when known (else our defaults, the reference's)."""
    arch = {"name": REFERENCE_ARCH, "loss": dict(REFERENCE_LOSS)}
    defaults = asdict(ModelConfig())
    for key, value in asdict(args).items():
        if key in ("name", "vocab_size", "seq_len", "causal"):
            continue  # the reference's loaders set these themselves (causal=True always)
        if key in REFERENCE_ARCH_FIELDS:
            arch[key] = value
        elif value != defaults[key]:  # a setting the reference has no field for
            raise ConfigError(f"model.{key}={value!r} cannot be represented in the reference "
                              f"(it has no {key} setting); not converted")
    train = {**asdict(TrainConfig()), **((training or {}).get("train") or {})}
    batch = int(train["global_batch_size"])
    sequences = train["max_steps"] * batch if train.get("max_steps") else train["max_sequences"]
    config = {"arch": arch, "dataset_name": "tinystories", "tokenizer_name": tokenizer_name,
              "seq_len": args.seq_len, "global_batch_size": batch,
              "max_sequences": int(sequences), "seed": train["seed"],
              "checkpoint_path": (training or {}).get("out_dir") or args.name,
              "eval_interval_sequences": train["eval_interval_sequences"],
              "checkpoint_interval_sequences": train["checkpoint_interval_sequences"]}
    config.update({k: train[k] for k in ("lr", "lr_min_ratio", "lr_warmup_percent",
                                         "weight_decay", "beta1", "beta2", "grad_clip_norm")})
    return config


def _tokenizer_for_reference(model_dir: Path, out_path: Path) -> str:
    """The ``tokenizer_name`` the reference reads; a SentencePiece model is written beside."""
    _, tokenizer = load(model_dir)
    if isinstance(tokenizer, GPTNeo10kTokenizer):
        return GPT_NEO_10K
    if isinstance(tokenizer, SentencePieceTokenizer):
        target = out_path.with_name(f"{out_path.stem}.tokenizer.model")
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            tokenizer.save(tmp).replace(target)  # save writes <tmp>/tokenizer.model
        return f"{SPM_MARKER}{target.name}"
    return NO_TOKENIZER


def mlx_to_torch(model_dir: str | Path, out_path: str | Path) -> Path:
    """Write a model directory as a reference ``step_N.pt`` (strict-loadable by the reference)."""
    torch = _torch()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state, extras = mlx_to_torch_state(model_dir, _tokenizer_for_reference(model_dir, out_path))
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    torch.save({"model_state_dict": state, **extras}, tmp)
    tmp.replace(out_path)
    return out_path
