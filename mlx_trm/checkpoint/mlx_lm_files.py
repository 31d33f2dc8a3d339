"""The files that make an mlx-trm model directory an mlx-lm model (see ``mlx_trm.interop``).

``write_mlx_lm_files`` adds ``mlx_lm_model.py`` (two imports from the installed package),
``model_file`` and ``eos_token_id`` in config.json, and ``tokenizer.json`` +
``tokenizer_config.json`` (our SentencePiece BPE rebuilt with the ``tokenizers`` library: same
ids, same text). Every checkpoint is written with them; this module imports no other part of
the package that could import it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.tokenizer import EOS_PIECE, SentencePieceTokenizer
from ..files import atomic_write

MODEL_FILE = "mlx_lm_model.py"
UNSUPPORTED_KEY = "mlx_lm_unsupported"

# What ``--trust-remote-code`` executes: imports from the installed package, nothing else.
MODEL_FILE_SOURCE = '''\
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
# Tokenizer: our SentencePiece BPE as a `tokenizers` pipeline


def hf_tokenizer(tokenizer: SentencePieceTokenizer) -> Any:
    """Rebuild our SentencePiece BPE as a ``tokenizers.Tokenizer`` with the same ids and text.

    SentencePiece BPE = dummy prefix + spaces as "▁" on the whole text (identity normalisation),
    then merges by piece score over it, byte fallback for characters outside the vocabulary. The
    same as a BPE whose merges are every split of each piece into two pieces, ranked by the
    piece's id. No pre-tokenizer: SentencePiece does not split either, and "\\n" (a user-defined
    piece) is not an added token, so "\\nX" still gets SentencePiece's single leading "▁".
    """
    # tokenizers comes with mlx-lm's transformers, not with mlx-trm itself
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
    """tokenizer_config.json: no BOS/EOS added, eos = end-of-story, text kept exactly; with
    trusted remote code the class is ``StoryTokenizer`` (an empty text encodes to end-of-story,
    so an empty prompt starts a story instead of killing mlx-lm's server)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "auto_map": {"AutoTokenizer": [None, f"{MODEL_FILE[:-3]}.StoryTokenizer"]},
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


def _converted(tokenizer: SentencePieceTokenizer) -> tuple[str, str | None]:
    """``(tokenizer.json text, problem)``, converted once per tokenizer object: a training run
    saves a checkpoint many times with the same tokenizer, and the conversion takes ~0.5 s."""
    cached = getattr(tokenizer, "_mlx_lm_conversion", None)
    if cached is None:
        hf = hf_tokenizer(tokenizer)
        cached = tokenizer._mlx_lm_conversion = (hf.to_str(), _conversion_problem(tokenizer, hf))
    return cached


def stale_tokenizer_note(dir: Path) -> str | None:
    """One line when ``dir``'s tokenizer_config.json predates ``StoryTokenizer`` (no
    ``auto_map``): there an empty prompt is zero tokens, which stops mlx_lm.server's generation
    thread for every client, so the directory should be refreshed."""
    path = Path(dir) / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # no mlx-lm files (or not ours to judge): nothing to refresh
    if "auto_map" in config:
        return None
    return (f"{dir}: its mlx-lm files predate StoryTokenizer, so under mlx_lm.server an empty "
            f"prompt stops generation for every client; refresh them (weights untouched): "
            f"python -m mlx_trm.cli.interop {dir}")


# ----------------------------------------------------------------------------------------------
# Writing a directory


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


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
                   f"then run python -m mlx_trm.cli.interop {dir}")
    elif not isinstance(tokenizer, SentencePieceTokenizer):
        problem = ("its gpt-neo-10k tokenizer remaps GPT-Neo's ids, which transformers' "
                   "AutoTokenizer cannot reproduce; use mlx_trm.generate / mlx_trm.chat, or "
                   "train with the SentencePiece tokenizer (the default)")
    else:
        hf_json, problem = _converted(tokenizer)
        if problem is None:
            atomic_write(dir / "tokenizer.json", hf_json)
            _write_json(dir / "tokenizer_config.json", hf_tokenizer_config())
    if problem is not None:
        config[UNSUPPORTED_KEY] = problem
    atomic_write(dir / MODEL_FILE, MODEL_FILE_SOURCE)
    _write_json(dir / "config.json", config)


