"""Run configuration: model, training and data settings as dataclasses.

A run is described by one YAML file with three sections (``model``, ``train``, ``data``) and a
top-level ``out_dir``. Field names in ``model`` are the reference's arch names (``H_cycles``,
``L_cycles``, ``halt_max_steps``, ...) so a config can be checked against the PyTorch project.
Command lines override single fields with ``section.key=value`` (``train.max_steps=200``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; CLIs print it as one line and exit with code 2."""


@dataclass
class ModelConfig:
    """Architecture of a (recursive) model; defaults are the reference's TinyStories values."""

    name: str = "trm"
    vocab_size: int = 10000
    seq_len: int = 512
    hidden_size: int = 64
    num_heads: int = 2
    expansion: float = 4.0
    H_cycles: int = 1
    L_cycles: int = 1
    H_layers: int = 0  # ignored by the reference (one shared L_level does both updates)
    L_layers: int = 2
    halt_max_steps: int = 1
    halt_exploration_prob: float = 0.0
    pos_encodings: str = "rope"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    forward_dtype: str = "float32"
    puzzle_emb_ndim: int = 0
    puzzle_emb_len: int = 0
    mlp_t: bool = False
    no_ACT_continue: bool = True
    tie_word_embeddings: bool = True
    causal: bool = True
    flat_transformer: bool = False
    use_moeut: bool = False
    # MoEUT (sigma-MoE feed-forward experts + SwitchHead attention experts)
    moe_ff_n_experts: int = 8
    moe_ff_expert_size: int = 192
    moe_ff_k: int = 2
    moe_att_n_experts: int = 2
    moe_att_k: int = 1
    moe_expert_dropout: float = 0.0
    moe_balance_coef: float = 0.0
    moe_bias_balancing: bool = True
    moe_bias_update_rate: float = 0.001
    moe_bias_momentum: float = 0.9
    moe_bias_clip: float = 1.0
    moe_entropy_reg: float = 0.01
    moe_att_entropy_reg: float = 0.001

    @property
    def kind(self) -> str:
        """'flat', 'moeut' or 'dense' (the three block variants)."""
        if self.flat_transformer:
            return "flat"
        return "moeut" if self.use_moeut else "dense"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def layer_applications_per_act_step(self) -> int:
        if self.flat_transformer:
            return self.L_layers
        return self.H_cycles * (self.L_cycles + 1) * self.L_layers

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"model: {message}")

        for name in ("vocab_size", "seq_len", "hidden_size", "num_heads", "L_layers",
                     "H_cycles", "L_cycles", "halt_max_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
             "pick num_heads that divides it")
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        need(0.0 <= self.halt_exploration_prob <= 1.0, "halt_exploration_prob must be in [0, 1]")
        need(self.pos_encodings == "rope", "only pos_encodings: rope is supported")
        need(self.puzzle_emb_len == 0 and self.puzzle_emb_ndim == 0,
             "puzzle embeddings are not used for language modelling; set puzzle_emb_len: 0")
        need(not self.mlp_t, "mlp_t mixes tokens across the sequence and breaks causality; "
             "set mlp_t: false")
        need(self.no_ACT_continue, "no_ACT_continue: false is broken in the reference; set it true")
        need(self.tie_word_embeddings, "only tie_word_embeddings: true is supported")
        need(self.causal, "language models need causal: true")
        need(self.forward_dtype == "float32", "only forward_dtype: float32 is supported")
        need(not (self.flat_transformer and self.use_moeut),
             "flat_transformer and use_moeut are exclusive; choose one")
        if self.use_moeut:
            need(1 <= self.moe_ff_k <= self.moe_ff_n_experts,
                 f"moe_ff_k {self.moe_ff_k} must be in [1, moe_ff_n_experts]")
            need(1 <= self.moe_att_k <= self.moe_att_n_experts,
                 f"moe_att_k {self.moe_att_k} must be in [1, moe_att_n_experts]")
            need(self.moe_att_n_experts >= 2,
                 "moe_att_n_experts: 1 (gated single-expert attention) is not supported")
            need(self.moe_ff_expert_size >= 1, "moe_ff_expert_size must be >= 1")
            need(self.moe_expert_dropout == 0.0,
                 "moe_expert_dropout is not implemented (0 in every reference config); set 0")
            need(self.moe_balance_coef == 0.0,
                 "moe_balance_coef (auxiliary balance loss) is not implemented; the reference "
                 "configs use bias balancing with coef 0")


@dataclass
class TrainConfig:
    """Optimisation and schedule. Defaults are the reference's 1M TinyStories values."""

    global_batch_size: int = 64
    max_sequences: int = 2_100_000
    max_steps: int | None = None  # overrides ceil(max_sequences / global_batch_size)
    grad_accum_steps: int = 1
    lr: float = 1e-2
    lr_min_ratio: float = 0.01
    lr_warmup_percent: float = 0.02
    # Share of the steps that run one ACT step per batch before deep supervision starts; 0 is
    # the reference. At small budgets the carry locks ACT models onto the unigram fixed point
    # (benchmarks/results/README.md, "The ACT warm-up"); a 1-step start avoids it.
    act_warmup_percent: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip_norm: float = 1.0
    seed: int = 42
    eval_interval_sequences: int | None = 10_000
    eval_batches: int = 10
    checkpoint_interval_sequences: int | None = 100_000
    log_interval: int = 10
    compile: bool = True
    # Recompute the layer activations of the back-propagated cycle in the backward pass instead
    # of keeping them (~1/4 more compute, a fraction of the memory). None: only when the step
    # would not fit the device's memory otherwise (mlx_trm/training/memory.py measures it at the
    # start).
    checkpoint_activations: bool | None = None
    resume: bool = False
    wandb: bool = False
    wandb_project: str = "mlx-trm"

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"train: {message}")

        need(self.global_batch_size >= 1, "global_batch_size must be >= 1")
        need(self.max_sequences >= 1, "max_sequences must be >= 1")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        need(self.grad_accum_steps >= 1, "grad_accum_steps must be >= 1")
        need(self.global_batch_size % self.grad_accum_steps == 0,
             f"global_batch_size {self.global_batch_size} is not divisible by grad_accum_steps "
             f"{self.grad_accum_steps}")
        need(self.lr > 0, "lr must be > 0")
        need(0.0 <= self.lr_min_ratio <= 1.0, "lr_min_ratio must be in [0, 1]")
        need(0.0 <= self.lr_warmup_percent < 1.0, "lr_warmup_percent must be in [0, 1)")
        need(0.0 <= self.act_warmup_percent < 1.0, "act_warmup_percent must be in [0, 1)")
        need(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "betas must be in [0, 1)")
        need(self.grad_clip_norm > 0, "grad_clip_norm must be > 0")
        need(self.eval_batches >= 1, "eval_batches must be >= 1")


@dataclass
class DataConfig:
    """Where stories come from and how they become batches."""

    path: str = "roneneldan/TinyStories"  # hub dataset id, a local file or a directory
    valid_path: str | None = None  # None: the hub's validation split, or valid.* beside path
    tokenizer: str | None = None  # None: the tokenizer shipped in the package
    text_field: str = "text"
    packing: bool = False  # several stories per row (off in the reference-named configs)
    cache_dir: str | None = None  # token cache; None: ~/.cache/mlx_trm/tokens
    max_stories: int | None = None  # read at most this many stories per split (for quick runs)

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("data: path is empty; set data.path to a dataset id, file or folder")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out_dir: str = "runs/default"

    def validate(self) -> Config:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown key '{key}' in {where}; {hint}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation (int, float, bool, str, X | None)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (annotation,) = [a for a in options if a is not type(None)]
    expected = annotation.__name__
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{where} must be {expected}, got {value!r}")


def dataclass_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build a config dataclass from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)  # real types, not the strings of postponed annotations
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in hints:
            raise _unknown_key(key, list(hints), where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def model_config_from_dict(values: dict[str, Any], *, strict: bool = True) -> ModelConfig:
    """ModelConfig from a dict; with ``strict=False`` unknown keys (e.g. mlx-lm's) are ignored."""
    if not strict:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        values = {k: v for k, v in values.items() if k in names}
    return dataclass_from_dict(ModelConfig, values, "model")


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split an override: ``'train.lr=3e-3'`` -> ``('train', 'lr', 0.003)``.

    ``'out_dir=x'`` has no section and gives ``('', 'out_dir', 'x')``.
    """
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (example: train.max_steps=200)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    if key == "out_dir":
        return "", key, raw
    if "." not in key:
        raise ConfigError(f"override key '{key}' needs a section: model.{key}, train.{key} or "
                          f"data.{key} (or out_dir)")
    section, name = key.split(".", 1)
    if section not in SECTIONS:
        raise _unknown_key(section, [*SECTIONS, "out_dir"], "the config")
    return section, name, value


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a YAML run config, apply ``section.key=value`` overrides, validate, and return it."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass --config configs/<name>.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}".replace("\n", " ")) from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping with model/train/data sections")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for override in overrides:
        section, name, value = parse_override(override)
        if section:
            raw.setdefault(section, {})[name] = value
        else:
            raw[name] = value
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A validated Config from a dict with model, train and data sections (and out_dir)."""
    for key in raw:
        if key not in (*SECTIONS, "out_dir"):
            raise _unknown_key(key, [*SECTIONS, "out_dir"], "the config")
    config = Config(
        model=dataclass_from_dict(ModelConfig, raw.get("model"), "model"),
        train=dataclass_from_dict(TrainConfig, raw.get("train"), "train"),
        data=dataclass_from_dict(DataConfig, raw.get("data"), "data"),
        out_dir=str(raw.get("out_dir", "runs/default")),
    )
    return config.validate()


def cli_errors(main: typing.Callable[..., Any]) -> typing.Callable[..., Any]:
    """Wrap a CLI entry point: a ConfigError becomes one line on stderr and exit code 2, Ctrl-C
    one line and exit code 130 (128 + SIGINT), wherever it lands: in the imports of mlx, mlx-lm,
    transformers or torch that a command makes after parsing, in loading, in generation."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapped
