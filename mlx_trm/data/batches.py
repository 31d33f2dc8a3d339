"""TinyStories data: sources, a token cache and the reference's batches.

Token cache: each (tokenizer, source, split, text field, max_stories) is tokenized once into
``<cache>/<name>-<split>-<key>/`` holding ``tokens.bin`` (uint16, every story's tokens followed by
end-of-story 0) and ``offsets.npy`` (int64, record i = ``tokens[offsets[i]:offsets[i+1]]``). The
key hashes the tokenizer's name and the files' paths, sizes and mtimes (a hub source: its id), so
editing a file or retraining the tokenizer re-tokenizes. Records of empty hub rows are kept with
length 0 so story indices match the hub dataset's (the reference skips them after shuffling).
The cache lives in ``data.cache_dir``, else ``$MLX_TRM_CACHE/tokens``, else
``~/.cache/mlx_trm/tokens``; it is written to a temporary directory renamed into place.

Batches (``iterate_batches``), exactly the reference's unless ``packing``: one story per row,
its tokens + 0 cut to ``seq_len + 1`` and right-padded with 0; ``inputs = row[:-1]``,
``labels = row[1:]`` with every 0 (end-of-story, padding) replaced by -100. Order: with
``max_sequences``, the stories are first subsampled with ``Generator(Philox(seed)).choice(N,
min(max_sequences, N), replace=False)``; each epoch (counted from 1) permutes them with
``Generator(Philox(seed + epoch))``. These are numpy's generators, the ones the reference uses, so
the order is the reference's for the same dataset. The last, smaller batch is yielded.
``packing=True`` (not the reference) fills rows with consecutive stories of that order, each
followed by 0; rows overlap by one token so every token is a label exactly once, a story that does
not fit continues on the next row, the last row is padded. Labels still mask 0, so the model is
not trained to emit end-of-story in either mode.

Stories are read by :mod:`mlx_trm.data.sources`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlx_trm.config import ConfigError
from mlx_trm.data.sources import (
    _CHUNK,
    Progress,
    Source,
    iter_story_chunks,
    resolve_source,
)

if TYPE_CHECKING:
    from mlx_trm.config import DataConfig
    from mlx_trm.data.tokenizer import Tokenizer

IGNORE_INDEX = -100
CACHE_FORMAT = 1



# ----------------------------------------------------------------------------- token cache


@dataclass
class TokenDataset:
    """Every story of one split as tokens: record i = ``tokens[offsets[i]:offsets[i + 1]]``.

    A record is the story's tokens followed by end-of-story (0); an empty hub row is an empty
    record. ``tokens`` is a read-only memory map when the dataset comes from the cache.
    """

    tokens: np.ndarray  # uint16 [n_tokens]
    offsets: np.ndarray  # int64 [n_records + 1]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the cache entry, None when built in memory

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per record, end-of-story included (0 for an empty row)."""
        return np.diff(self.offsets)

    @property
    def n_stories(self) -> int:
        return int(np.count_nonzero(self.lengths))

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def story(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def default_cache_dir() -> Path:
    root = os.environ.get("MLX_TRM_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "mlx_trm") / "tokens"


def _records(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint16 tokens with a 0 after each non-empty story, record lengths)."""
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
    if flat.size and (flat.max() > 65535 or flat.min() < 0):
        raise ConfigError("token ids above 65,535 cannot be cached as uint16; use a smaller vocab")
    rec = np.where(lens > 0, lens + 1, 0)
    out = np.zeros(int(rec.sum()), dtype=np.uint16)
    keep = np.ones(out.size, dtype=bool)
    keep[np.cumsum(rec)[lens > 0] - 1] = False  # end-of-story slots stay 0
    out[keep] = flat
    return out, rec


def _tokenize_into(chunks: Iterable[tuple[list[str], float, float]], tokenizer: Tokenizer,
                   sink: Callable[[np.ndarray], None], progress: Progress | None) -> np.ndarray:
    encode = getattr(tokenizer, "encode_batch", None) or (lambda xs: [tokenizer.encode(x)
                                                                      for x in xs])
    lengths, stories, before = [], 0, 0.0
    for texts, done, total in chunks:
        for i in range(0, len(texts), _CHUNK):
            flat, rec = _records(encode(texts[i:i + _CHUNK]))
            sink(flat)
            lengths.append(rec)
            stories += int(np.count_nonzero(rec))
            if progress is not None:  # interpolate within a large source chunk
                progress(stories, before + (done - before) * min(i + _CHUNK, len(texts))
                         / len(texts), total)
        if progress is not None:
            progress(stories, done, total)
        before = done
    offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return offsets


def _check_nonempty(offsets: np.ndarray, label: str) -> None:
    if offsets[-1] == 0:
        raise ConfigError(f"{label}: no stories found; point data.path at the stories")


def _in_memory(chunks: Iterable[tuple[list[str], float, float]], tokenizer: Tokenizer,
               meta: dict[str, Any], progress: Progress | None) -> TokenDataset:
    parts: list[np.ndarray] = []
    offsets = _tokenize_into(chunks, tokenizer, parts.append, progress)
    _check_nonempty(offsets, meta.get("source", "stories"))
    return TokenDataset(np.concatenate(parts), offsets, meta)


def _open_entry(entry: Path) -> TokenDataset | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        offsets = np.load(entry / "offsets.npy")
        n = int(offsets[-1])
        if meta.get("format") != CACHE_FORMAT or (entry / "tokens.bin").stat().st_size != 2 * n:
            return None
        tokens = np.memmap(entry / "tokens.bin", dtype=np.uint16, mode="r", shape=(n,))
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return TokenDataset(tokens, offsets, meta, entry)


def tokenize_stories(stories: Iterable[str], tokenizer: Tokenizer, *,
                     cache_dir: str | os.PathLike | None = None, key: str | None = None,
                     meta: dict[str, Any] | None = None, progress: Progress | None = None,
                     ) -> TokenDataset:
    """Tokenize ``stories``; with a ``key`` the result is cached under ``cache_dir`` by it.

    A cached entry with the same key is reused as is (the caller makes the key unique).
    """
    stories = list(stories)
    chunks = [(stories, len(stories), len(stories))]
    meta = dict(meta or {}, tokenizer=tokenizer.name)
    if key is None:
        return _in_memory(chunks, tokenizer, meta, progress)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return _cached(root / key, lambda: chunks, tokenizer, meta, progress)


def _cached(entry: Path, make_chunks: Callable[[], Iterable[tuple[list[str], float, float]]],
            tokenizer: Tokenizer, meta: dict[str, Any], progress: Progress | None,
            ) -> TokenDataset:
    found = _open_entry(entry)
    if found is not None:
        return found
    chunks = make_chunks()  # only now is the source read
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".tmp-{entry.name}-"))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    except OSError as e:
        warnings.warn(f"token cache {entry.parent} is not writable ({e.strerror}); tokens are "
                      "kept in memory only", stacklevel=3)
        return _in_memory(chunks, tokenizer, meta, progress)
    try:
        with open(tmp / "tokens.bin", "wb") as f:
            offsets = _tokenize_into(chunks, tokenizer, lambda a: f.write(a.tobytes()), progress)
        _check_nonempty(offsets, meta.get("source", "stories"))
        np.save(tmp / "offsets.npy", offsets)
        meta = dict(meta, format=CACHE_FORMAT, n_records=len(offsets) - 1,
                    n_tokens=int(offsets[-1]))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished the same entry first: use theirs
            if _open_entry(entry) is None:
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = _open_entry(entry)
    assert found is not None, f"token cache entry {entry} unreadable right after writing"
    return found


def cache_key(source: Source, tokenizer: Tokenizer, text_field: str = "text",
              max_stories: int | None = None) -> str:
    """The cache entry name: readable prefix + hash of everything the tokens depend on."""
    ident = {"format": CACHE_FORMAT, "tokenizer": tokenizer.name, "source": source.identity(),
             "text_field": text_field, "max_stories": max_stories}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(source.label()).name.split(".")[0]).strip("_")
    return f"{stem or 'data'}-{source.split}-{digest}"


def load_tokens(source: str | os.PathLike | Source, tokenizer: Tokenizer, *,
                split: str = "train", text_field: str = "text", max_stories: int | None = None,
                cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                rebuild: bool = False, progress: Progress | None = None) -> TokenDataset:
    """Tokens of one split of ``source``, from the cache when possible (no file is read then)."""
    src = source if isinstance(source, Source) else resolve_source(source, split)
    meta = {"source": src.label(), "split": src.split, "text_field": text_field,
            "max_stories": max_stories, "tokenizer": tokenizer.name}
    chunks = functools.partial(iter_story_chunks, src, text_field, max_stories)  # read lazily
    if not use_cache:
        return _in_memory(chunks(), tokenizer, meta, progress)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    entry = root / cache_key(src, tokenizer, text_field, max_stories)
    if rebuild and entry.exists():
        shutil.rmtree(entry)
    return _cached(entry, chunks, tokenizer, meta, progress)


def load_split(data: DataConfig, split: str, tokenizer: Tokenizer, *,
               progress: Progress | None = None) -> TokenDataset:
    """One split as a run's ``data`` section describes it (path, valid_path, cache...)."""
    src = resolve_source(data.path, split, valid_path=data.valid_path)
    return load_tokens(src, tokenizer, text_field=data.text_field, max_stories=data.max_stories,
                       cache_dir=data.cache_dir, progress=progress)


def load_eval_tokens(data: str | os.PathLike, tokenizer: Tokenizer, split: str = "validation", *,
                     text_field: str = "text", max_stories: int | None = None) -> TokenDataset:
    """The ``split`` of ``data`` for evaluation; a single file (which has no splits) as is."""
    try:
        source = resolve_source(data, split)
    except ConfigError:
        source = resolve_source(data, "train")
    return load_tokens(source, tokenizer, text_field=text_field, max_stories=max_stories)


# ----------------------------------------------------------------------------- batches


def _philox(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(seed=seed))


def epoch_order(dataset: TokenDataset, *, seed: int = 42, epoch: int = 1,
                max_sequences: int | None = None) -> np.ndarray:
    """Record indices in the order epoch ``epoch`` (from 1) visits them, empty rows dropped.

    The reference's: subsample with Philox(seed) when ``max_sequences`` is set, then permute
    with Philox(seed + epoch).
    """
    n = len(dataset)
    if max_sequences is not None:
        base = _philox(seed).choice(n, size=min(int(max_sequences), n), replace=False)
    else:
        base = np.arange(n)
    order = _philox(seed + epoch).permutation(base)
    return order[dataset.lengths[order] > 0]


def _to_batch(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inputs = np.ascontiguousarray(rows[:, :-1])
    labels = rows[:, 1:].copy()
    labels[labels == 0] = IGNORE_INDEX
    return inputs, labels


def story_rows(dataset: TokenDataset, indices: np.ndarray, seq_len: int) -> np.ndarray:
    """int32 [len(indices), seq_len + 1]: each story + end-of-story, cut or 0-padded."""
    starts = dataset.offsets[indices]
    lens = np.minimum(dataset.offsets[indices + 1] - starts, seq_len + 1)
    cols = np.arange(seq_len + 1)
    mask = cols < lens[:, None]
    where = np.where(mask, starts[:, None] + cols, 0)
    rows = np.asarray(dataset.tokens[where.ravel()], dtype=np.int32).reshape(where.shape)
    rows[~mask] = 0
    return rows


class _Packer:
    """Rows of ``seq_len + 1`` tokens over the stories of ``order`` laid end to end."""

    def __init__(self, dataset: TokenDataset, order: np.ndarray, seq_len: int):
        self.dataset, self.order, self.seq_len = dataset, order, seq_len
        self.lens = dataset.lengths[order]
        self.ends = np.cumsum(self.lens)
        self.total = int(self.ends[-1]) if len(order) else 0
        # row r covers stream[r*L : r*L + L + 1]: consecutive rows share one token
        self.n_rows = max(0, -(-(self.total - 1) // seq_len))

    def rows(self, first: int, count: int) -> np.ndarray:
        L = self.seq_len
        pos = (np.arange(first, first + count) * L)[:, None] + np.arange(L + 1)
        valid = pos < self.total
        pos = np.where(valid, pos, 0)
        k = np.searchsorted(self.ends, pos, side="right")  # which story holds each position
        within = pos - (self.ends[k] - self.lens[k])
        where = self.dataset.offsets[self.order[k]] + within
        rows = np.asarray(self.dataset.tokens[where.ravel()], dtype=np.int32).reshape(pos.shape)
        rows[~valid] = 0
        return rows


def num_batches(dataset: TokenDataset, batch_size: int, seq_len: int, *, seed: int = 42,
                max_sequences: int | None = None, packing: bool = False,
                drop_remainder: bool = False) -> int:
    """Batches in one epoch (the same for every epoch)."""
    order = epoch_order(dataset, seed=seed, epoch=1, max_sequences=max_sequences)
    n = _Packer(dataset, order, seq_len).n_rows if packing else len(order)
    return n // batch_size if drop_remainder else -(-n // batch_size)


def iterate_batches(dataset: TokenDataset, batch_size: int, seq_len: int, *, seed: int = 42,
                    epoch: int = 1, max_sequences: int | None = None, packing: bool = False,
                    drop_remainder: bool = False, start_batch: int = 0,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of ``(inputs, labels)``, int32 ``[B, seq_len]``; labels are -100 where masked.

    Deterministic for (seed, epoch); ``start_batch`` skips that many batches without building
    them, to resume mid-epoch. The last batch may be smaller unless ``drop_remainder``.
    """
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
    order = epoch_order(dataset, seed=seed, epoch=epoch, max_sequences=max_sequences)
    packer = _Packer(dataset, order, seq_len) if packing else None
    n = packer.n_rows if packer else len(order)
    stop = n - n % batch_size if drop_remainder else n
    for first in range(start_batch * batch_size, stop, batch_size):
        count = min(batch_size, stop - first)
        if packer:
            rows = packer.rows(first, count)
        else:
            rows = story_rows(dataset, order[first:first + count], seq_len)
        yield _to_batch(rows)


def stream_batches(dataset: TokenDataset, batch_size: int, seq_len: int, *, seed: int = 42,
                   start_epoch: int = 1, start_batch: int = 0, max_sequences: int | None = None,
                   packing: bool = False, drop_remainder: bool = False,
                   ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Endless ``(epoch, batch_index, inputs, labels)`` over epochs start_epoch, +1, ...

    To resume after a stored (epoch, batch_index), pass ``start_epoch=epoch,
    start_batch=batch_index + 1`` (an index past the epoch's end starts the next one).
    """
    epoch, skip = start_epoch, start_batch
    while True:
        produced = False
        for i, (inputs, labels) in enumerate(iterate_batches(
                dataset, batch_size, seq_len, seed=seed, epoch=epoch,
                max_sequences=max_sequences, packing=packing, drop_remainder=drop_remainder,
                start_batch=skip), start=skip):
            produced = True
            yield epoch, i, inputs, labels
        if not produced and skip == 0:
            raise ConfigError(
                f"{dataset.meta.get('source', 'the dataset')} gives no batch of {batch_size}; "
                "lower the batch size or add stories"
            )
        epoch, skip = epoch + 1, 0


def eval_batches(dataset: TokenDataset, batch_size: int, seq_len: int, n_batches: int = 10, *,
                 seed: int = 42, max_sequences: int | None = None,
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``n_batches`` batches of epoch 1: the same every call.

    The reference evaluates the first 10 such batches of the validation split; it builds that
    split like the train split, so pass ``max_sequences=train.max_sequences`` to get its exact
    stories (Philox(seed).choice, then the Philox(seed + 1 = 43) permutation).
    """
    batches = iterate_batches(dataset, batch_size, seq_len, seed=seed, epoch=1,
                              max_sequences=max_sequences)
    return [b for _, b in zip(range(n_batches), batches)]


def token_stats(dataset: TokenDataset, seq_len: int) -> dict[str, float]:
    """Summary numbers of a split at one story per row of ``seq_len + 1`` tokens."""
    lens = dataset.lengths
    lens = lens[lens > 0] - 1  # text tokens, end-of-story excluded
    row = np.minimum(lens + 1, seq_len + 1)
    return {
        "stories": int(lens.size),
        "tokens": int(lens.sum()),
        "tokens_per_story_mean": float(lens.mean()),
        "tokens_per_story_median": float(np.median(lens)),
        "tokens_per_story_max": int(lens.max()),
        "padding_fraction": float(1.0 - row.sum() / (lens.size * (seq_len + 1))),
        # labels row[1:]: text tokens after the first are learned; end-of-story and padding not
        "masked_label_fraction": float(
            1.0 - (np.minimum(lens, seq_len + 1) - 1).sum() / (lens.size * seq_len)),
        "truncated": int(np.count_nonzero(lens + 1 > seq_len + 1)),
    }
