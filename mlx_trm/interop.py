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

The cache is the recursion-aware :class:`~mlx_trm.models.cache.KVCache`: it has mlx-lm's cache
protocol (``offset``, ``state``, chunked prefill, exact ``trim``, so the server's prompt cache
reuse is exact). KV quantization (``--kv-bits``) is refused; having no ``merge``, the server serves
requests one at a time instead of batching them. Directories with the gpt-neo-10k tokenizer (or
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
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig, cli_errors, model_config_from_dict
from .models.trm import Model as TRMModel
from .tokenizer import EOS_PIECE, SentencePieceTokenizer

MODEL_FILE = "mlx_lm_model.py"
UNSUPPORTED_KEY = "mlx_lm_unsupported"

# What ``--trust-remote-code`` executes: imports from the installed package, nothing else.
MODEL_FILE_SOURCE = '''\
"""mlx-lm entry point of an mlx-trm model directory (config.json names it as ``model_file``).

``mlx_lm.generate/chat/server --model DIR --trust-remote-code`` run this file. It only imports the
architecture from the installed ``mlx_trm`` package; see mlx_trm/interop.py there.
"""

import importlib.util

if importlib.util.find_spec("mlx_trm") is None:
    raise ImportError(
        "this model directory was written by mlx-trm, and mlx-lm needs the mlx_trm package to "
        "build it: install it into the same environment (pip install -e /path/to/mlx-trm)"
    )

from mlx_trm.interop import Model, ModelArgs  # noqa: E402,F401
'''

# The messages' text joined into one story (roles are ignored: these are story models, not
# assistants); a space goes between two messages unless one already has whitespace there. A single
# message renders as itself, so mlx_lm.generate's default chat-template path encodes the raw prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set text = message['content'] -%}"
    "{%- if not loop.first and text[:1] not in [' ', '\\n']"
    " and messages[loop.index0 - 1]['content'][-1:] not in [' ', '\\n'] -%}"
    "{{- ' ' -}}"
    "{%- endif -%}"
    "{{- text -}}"
    "{%- endfor -%}"
)

# Strings the converted tokenizer must encode exactly as SentencePiece does before it is written
# (a guard against a model our conversion does not cover, e.g. a unigram SentencePiece model).
_PROBES = [
    "Once upon a time, there was a little girl named Lily.",
    "\nLeading newline, double  spaces,   and a trailing space \n\n“Quotes” – café 🙂 1234.",
    " x", "", "<|endoftext|>",
]


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


class _TrmConfigWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "model of type `trm`" not in record.getMessage()


def _quiet_transformers_config_warning() -> None:
    """transformers' AutoTokenizer reads config.json, does not know ``model_type: trm`` and warns
    that it builds a generic config. Harmless for a tokenizer; drop only that message."""
    logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _TrmConfigWarningFilter) for f in logger.filters):
        logger.addFilter(_TrmConfigWarningFilter())


# ----------------------------------------------------------------------------------------------
# Tokenizer: our SentencePiece BPE as a `tokenizers` pipeline


def hf_tokenizer(tokenizer: SentencePieceTokenizer) -> Any:
    """Rebuild our SentencePiece BPE as a ``tokenizers.Tokenizer`` with the same ids and text.

    SentencePiece BPE = dummy prefix + spaces as "▁" on the whole text (identity normalisation),
    then merges by piece score over it, byte fallback for characters outside the vocabulary. The
    same as a BPE whose merges are every split of each piece into two pieces, ranked by the
    piece's id. No pre-tokenizer: SentencePiece does not split either, and "\\n" (a user-defined
    piece) is not an added token, so "\\nX" still gets SentencePiece's single leading "▁".
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    sp = tokenizer._sp
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for i, piece in enumerate(pieces):
        if sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], left, right))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in merges],
                               unk_token=pieces[0], byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    # transformers' Llama decoder: mlx-lm recognises it and streams with its SPM detokenizer.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    # end-of-story is special (eos, skipped by decode(skip_special_tokens=True)); in text it stays
    # ordinary characters, as in our tokenizer (split_special_tokens in tokenizer_config.json).
    tok.add_special_tokens([AddedToken(EOS_PIECE, special=True, normalized=False)])
    tok.encode_special_tokens = True
    return tok


def hf_tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json: no BOS/EOS added, eos = end-of-story, text kept exactly."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_PIECE,
        "unk_token": EOS_PIECE,
        "pad_token": EOS_PIECE,
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # " ." must stay " ."
        "split_special_tokens": True,  # a literal "<|endoftext|>" in text is not id 0
        "chat_template": CHAT_TEMPLATE,
    }


def _conversion_problem(tokenizer: SentencePieceTokenizer, hf: Any) -> str | None:
    for text in _PROBES:
        if hf.encode(text, add_special_tokens=False).ids != tokenizer.encode(text):
            return f"the tokenizer ({tokenizer.source}) does not convert exactly (text {text!r})"
    return None


# ----------------------------------------------------------------------------------------------
# Writing a directory


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_mlx_lm_files(dir: Path, config: dict[str, Any], tokenizer: Any) -> None:
    """Make model directory ``dir`` an mlx-lm model: model file, config fields, tokenizer files.

    ``config`` is the directory's config.json content; it is rewritten with ``model_file`` and
    ``eos_token_id`` added (and ``mlx_lm_unsupported`` when the tokenizer cannot be served).
    """
    dir = Path(dir)
    config = {k: v for k, v in config.items() if k != UNSUPPORTED_KEY}
    config.update(model_file=MODEL_FILE, eos_token_id=0)
    problem = None
    if tokenizer is None:
        problem = ("it has no tokenizer; save it with one (mlx_trm.convert --tokenizer ...), "
                   f"then run python -m mlx_trm.interop {dir}")
    elif not isinstance(tokenizer, SentencePieceTokenizer):
        problem = ("its gpt-neo-10k tokenizer remaps GPT-Neo's ids, which transformers' "
                   "AutoTokenizer cannot reproduce; use mlx_trm.generate / mlx_trm.chat, or "
                   "train with the SentencePiece tokenizer (the default)")
    else:
        hf = hf_tokenizer(tokenizer)
        problem = _conversion_problem(tokenizer, hf)
        if problem is None:
            _write_text(dir / "tokenizer.json", hf.to_str())
            _write_json(dir / "tokenizer_config.json", hf_tokenizer_config())
    if problem is not None:
        config[UNSUPPORTED_KEY] = problem
    _write_text(dir / MODEL_FILE, MODEL_FILE_SOURCE)
    _write_json(dir / "config.json", config)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    """``python -m mlx_trm.interop DIR``: add the mlx-lm files to an existing model directory."""
    from .checkpoint import load_dir_tokenizer, read_model_config, resolve_model_dir

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
