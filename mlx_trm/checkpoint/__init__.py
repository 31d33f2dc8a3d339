"""Model directories: config.json + model.safetensors (+ tokenizer, + train_state/ to resume).

Every write goes to a temporary sibling directory that is renamed into place, so a crash never
leaves a half-written checkpoint, and the previous one survives until the new one is complete
(``mlx_trm.files``). Loading names a truncated file or non-finite weights in one line.
Every directory is also an mlx-lm model (``mlx_lm_files.py`` writes what mlx-lm reads;
``mlx_trm.interop`` is the architecture it builds) and may hold quantized weights
(``quantize.py``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..config import ConfigError, ModelConfig, dataclass_from_dict, model_config_from_dict
from ..data.tokenizer import load_tokenizer
from ..files import atomic_write, write_atomic_dir
from ..models import build_model
from .mlx_lm_files import stale_tokenizer_note, write_mlx_lm_files
from .quantize import quantize_skeleton

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def model_weights(model: nn.Module) -> dict[str, mx.array]:
    """All arrays a model needs to be rebuilt: parameters and buffers (H_init, expert biases...)."""
    return dict(tree_flatten(model.parameters()))


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (None when it is).

    Reads only the header: 8 bytes of header length, a JSON header, then the data, whose end
    is the largest ``data_offsets`` end. A file cut short by a crash or a full disk fails it.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return "truncated (the header is cut short)"
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"not a safetensors file ({type(e).__name__})"
    if size < 8 + n + end:
        return f"truncated ({size} of {8 + n + end} bytes)"
    return None


def read_safetensors(path: Path, fix: str) -> dict[str, mx.array]:
    """``mx.load`` of a safetensors file, or a one-line ConfigError ending with ``fix``."""
    if problem := safetensors_problem(path):
        raise ConfigError(f"{path} is {problem}; {fix}")
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); {fix}") from None


def nonfinite_weights(weights: dict[str, mx.array]) -> list[str]:
    """Names of the floating-point arrays holding a NaN or an infinity."""
    floats = {k: v for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)}
    if not floats:
        return []
    flags = mx.stack([mx.all(mx.isfinite(v)) for v in floats.values()]).tolist()
    return [k for k, ok in zip(floats, flags) if not ok]


def require_finite(weights: dict[str, mx.array], source: Path) -> None:
    """Refuse weights with a NaN or an infinity: every output of such a model is garbage."""
    if bad := nonfinite_weights(weights):
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise ConfigError(f"{source} holds NaN or infinite values in {len(bad)} of "
                          f"{len(weights)} tensors ({names}): the run that wrote it diverged; "
                          "use an earlier checkpoint or retrain with a lower train.lr")


def model_config_json(config: ModelConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    data = {"model_type": "trm", **asdict(config)}
    data.update(extra or {})
    return data


def write_model_dir(dir: Path, model: nn.Module, tokenizer: Any = None,
                    extra_config: dict[str, Any] | None = None) -> None:
    """Write a model's config, weights and tokenizer into an existing directory."""
    config = model_config_json(model.args, extra_config)
    atomic_write(dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    mx.save_safetensors(str(dir / WEIGHTS_FILE), model_weights(model), metadata={"format": "mlx"})
    if tokenizer is not None:
        tokenizer.save(dir)
    write_mlx_lm_files(dir, config, tokenizer)  # also an mlx-lm model (mlx_lm.generate/server)


def save(path: str | Path, model: nn.Module, tokenizer: Any = None,
         extra_config: dict[str, Any] | None = None,
         extra_files: Callable[[Path], None] | None = None) -> Path:
    """Save ``model`` (and ``tokenizer``) as a model directory, atomically."""

    def write(tmp: Path) -> None:
        write_model_dir(tmp, model, tokenizer, extra_config)
        if extra_files is not None:
            extra_files(tmp)

    return write_atomic_dir(path, write)


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a training run directory holding one in ``model/``."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    return path


def read_model_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig of a model directory, and its raw config.json."""
    path = resolve_model_dir(path)
    if not path.is_dir():
        raise ConfigError(f"model directory {path} not found; pass --model DIR of a saved model "
                          "(or convert a PyTorch checkpoint with mlx_trm.convert)")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"{path} is not a model directory (no {CONFIG_FILE}); pass the folder "
                          "written by mlx_trm.train, mlx_trm.save or mlx_trm.convert")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); re-save or re-convert the model") from e
    if raw.get("model_type") != "trm":
        raise ConfigError(f"{file} has model_type {raw.get('model_type')!r}, not 'trm'; "
                          "this loader reads mlx-trm model directories only")
    return model_config_from_dict(raw, strict=False), raw


def load_weights_strict(model: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Load weights, naming every missing, unexpected or mis-shaped key.

    Older names are first renamed by the model's ``sanitize`` (as mlx-lm's loader does).
    """
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    expected = model_weights(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:8])}"
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:8])}"
                         + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
        raise ConfigError(f"{source} does not match the architecture in its config; "
                          + "; ".join(parts))
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ConfigError(f"{source}: shape mismatch for {key}: checkpoint "
                              f"{tuple(value.shape)} vs model {tuple(expected[key].shape)}")
    model.update(tree_unflatten([(k, v.astype(expected[k].dtype)) for k, v in weights.items()]))


def load(path: str | Path, model_config: dict[str, Any] | None = None
         ) -> tuple[nn.Module, Any]:
    """Load a model directory: ``(model, tokenizer)``; tokenizer is None if the dir has none.

    ``model_config`` overrides config fields at load time, e.g. ``{"halt_max_steps": 8}`` for more
    test-time refinement (the weights do not depend on it). Same signature as ``mlx_lm.load``.
    """
    path = resolve_model_dir(path)
    config, raw = read_model_config(path)
    if model_config:
        config = dataclass_from_dict(ModelConfig, {**asdict(config), **model_config}, "model")
    model = build_model(config)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise ConfigError(f"{path} has no {WEIGHTS_FILE}; the directory is incomplete")
    weights = read_safetensors(weights_file, "the file is damaged: save or convert the model "
                               "again, or use an earlier checkpoint")
    require_finite(weights, weights_file)
    quantize_skeleton(model, raw, weights)  # mlx_lm.convert -q directories
    load_weights_strict(model, weights, str(weights_file))
    mx.eval(model.parameters())
    if note := stale_tokenizer_note(path):
        warnings.warn(note, stacklevel=2)
    return model, load_dir_tokenizer(path)


def load_dir_tokenizer(path: Path) -> Any:
    if (path / "tokenizer.model").is_file() or (path / "tokenizer.json").is_file():
        return load_tokenizer(str(path))
    return None
