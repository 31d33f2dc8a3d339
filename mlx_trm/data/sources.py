"""Where stories come from: hub datasets, local files and folders, and their splits.

Sources (``data.path``):

- ``tinystories-sample``: the TinyStories sample shipped in the package (``mlx_trm/assets/
  tinystories``: 5,978 training and 1,477 validation stories, CDLA-Sharing-1.0), so a first run
  needs no network and works from any working directory;
- a hub dataset id (``roneneldan/TinyStories``), read with ``datasets`` (imported only then);
- a file: ``.txt`` (stories separated by ``<|endoftext|>``; a file without one is one story),
  ``.jsonl`` (one object a line, the story in ``text_field``), ``.parquet`` (a ``text_field``
  column); text files may be compressed (``.xz``, ``.gz``, ``.bz2``);
- a directory of such files (searched recursively, sorted by path).

Splits: a file or directory entry belongs to a split when a word of its name (or of a folder name
below the directory) says so: ``train``; ``valid``/``validation``/``val``/``dev``; ``test``.
A directory with split-named files gives each split its files; one without gives every file to
``train``. For a single ``...train...`` file, ``validation`` reads the sibling with ``train``
replaced by ``valid``/``validation``/``val``; otherwise set ``data.valid_path``.
Every story is ``.strip()``-ed (as the reference does) and empty ones are skipped.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_trm.config import ConfigError

if TYPE_CHECKING:
    pass

SEPARATOR = "<|endoftext|>"
# suffix -> a reader over an open binary file
Opener = Callable[[Any], Any]
_COMPRESSED: dict[str, Opener] = {
    ".xz": lzma.LZMAFile, ".lzma": lzma.LZMAFile, ".bz2": bz2.BZ2File,
    ".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
}
_TEXT_SUFFIXES = {".txt", ".text"}
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_SPLIT_WORDS = {"train": "train", "training": "train", "valid": "validation",
                "validation": "validation", "val": "validation", "dev": "validation",
                "test": "test"}
_BLOCK = 8 << 20  # bytes read per step from a text file
_CHUNK = 4096  # stories per read (and per tokenizer call in mlx_trm.data)

# data.path naming the shipped sample (a local file or folder of that name wins)
SAMPLE = "tinystories-sample"
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "assets" / "tinystories"

# progress(stories_done, work_done, work_total): work is input bytes (files) or rows (hub)
Progress = Callable[[int, float, float], None]


# ----------------------------------------------------------------------------- sources


def normalize_split(split: str) -> str:
    name = _SPLIT_WORDS.get(split.lower())
    if name is None:
        raise ConfigError(f"unknown split {split!r}; use train, validation or test")
    return name


@dataclass(frozen=True)
class Source:
    """Where one split's stories come from: local files or a hub dataset id."""

    name: str  # what the user gave (path or id)
    split: str
    files: tuple[Path, ...] = ()
    hub_id: str | None = None

    def identity(self) -> dict[str, Any]:
        """What the token cache key depends on (cheap: no file is read)."""
        if self.hub_id is not None:
            return {"hub": self.hub_id, "split": self.split}
        stats = []
        for f in self.files:
            st = f.stat()
            stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        return {"files": stats, "split": self.split}

    def label(self) -> str:
        return self.hub_id or (str(self.files[0]) if len(self.files) == 1 else self.name)


def _file_format(path: Path) -> tuple[str, Opener | None] | None:
    """('txt' | 'jsonl' | 'parquet', decompressor) for a supported file name, else None."""
    suffixes = [s.lower() for s in path.suffixes]
    opener = _COMPRESSED.get(suffixes[-1]) if suffixes else None
    if opener is not None:
        suffixes = suffixes[:-1]
    inner = suffixes[-1] if suffixes else None
    if inner == ".parquet" and opener is None:
        return "parquet", None
    if inner in _JSONL_SUFFIXES:
        return "jsonl", opener
    if inner in _TEXT_SUFFIXES or opener is not None:
        return "txt", opener  # a bare .gz / .xz is compressed text
    return None


def _split_of(name: str) -> str | None:
    for word in re.split(r"[^a-z]+", name.lower()):
        if word in _SPLIT_WORDS:
            return _SPLIT_WORDS[word]
    return None


def _looks_like_hub_id(source: str) -> bool:
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None
            and _file_format(Path(source)) is None and not source.startswith("."))


def _missing(source: str) -> ConfigError:
    return ConfigError(
        f"data path {source!r} does not exist; set data.path to a .txt/.txt.xz/.jsonl/.parquet "
        "file, a directory of them, a hub dataset id such as roneneldan/TinyStories, or "
        f"{SAMPLE} (the sample shipped with mlx-trm)"
    )


def _scan(root: Path) -> list[tuple[Path, str | None]]:
    """Supported files below ``root`` (sorted, hidden ones skipped) with their split tags."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if _file_format(path) is None:
            continue
        tags = [_split_of(part) for part in rel.parts]
        found.append((path, next((t for t in reversed(tags) if t), None)))
    if not found:
        raise ConfigError(
            f"{root} holds no .txt, .txt.xz, .gz, .jsonl or .parquet files; point data.path at "
            "the stories"
        )
    return found


def _directory_files(root: Path, split: str) -> list[Path]:
    found = _scan(root)
    if all(tag is None for _, tag in found):
        if split == "train":
            return [p for p, _ in found]
        raise ConfigError(
            f"{root} has no {split} files (no file or folder named like '{split}'); set "
            f"data.valid_path to the {split} stories"
        )
    chosen = [p for p, tag in found if tag == split]
    if not chosen:
        tags = ", ".join(sorted({t or "untagged" for _, t in found}))
        raise ConfigError(
            f"{root} has no {split} files (found: {tags}); set data.valid_path to the {split} "
            "stories"
        )
    return chosen


def _sibling(path: Path, split: str) -> Path | None:
    words = {"validation": ("valid", "validation", "val", "dev"), "test": ("test",),
             "train": ("train",)}[split]
    pattern = re.compile(r"(?<![A-Za-z])(train|training|valid|validation|val|dev|test)"
                         r"(?![A-Za-z])", re.IGNORECASE)
    if not pattern.search(path.name):
        return None
    for word in words:
        candidate = path.with_name(pattern.sub(word, path.name, count=1))
        if candidate.is_file():
            return candidate
    return None


def resolve_source(source: str | os.PathLike, split: str = "train",
                   valid_path: str | os.PathLike | None = None) -> Source:
    """Work out which files (or hub dataset) hold ``split`` of ``source``.

    ``valid_path``, when given, is read as it is for the validation split.
    """
    split = normalize_split(split)
    if split == "validation" and valid_path:
        return _resolve_as_is(str(valid_path), split)
    text = str(source)
    path = _local_path(text)
    if path.is_dir():
        return Source(text, split, tuple(_directory_files(path, split)))
    if path.is_file():
        if _file_format(path) is None:
            raise ConfigError(
                f"{path}: unsupported file type; use .txt, .txt.xz, .gz, .jsonl or .parquet"
            )
        # a file named as data.path is the training data whatever its name says
        if split == "train" or _split_of(path.name) == split:
            return Source(text, split, (path,))
        sibling = _sibling(path, split)
        if sibling is None:
            raise ConfigError(
                f"data.path {path} is a single file and no {split} file lies beside it; set "
                f"data.valid_path to the {split} stories"
            )
        return Source(text, split, (sibling,))
    if _looks_like_hub_id(text):
        return Source(text, split, hub_id=text)
    raise _missing(text)


def _local_path(text: str) -> Path:
    """``text`` as a path; the shipped sample's folder for ``tinystories-sample``."""
    path = Path(text).expanduser()
    return SAMPLE_DIR if text == SAMPLE and not path.exists() else path


def _resolve_as_is(text: str, split: str) -> Source:
    path = _local_path(text)
    if path.is_dir():
        found = _scan(path)
        files = [p for p, tag in found if tag == split] or [p for p, _ in found]
        return Source(text, split, tuple(files))
    if path.is_file():
        if _file_format(path) is None:
            raise ConfigError(f"{path}: unsupported file type; use .txt, .gz, .jsonl or .parquet")
        return Source(text, split, (path,))
    if _looks_like_hub_id(text):
        return Source(text, split, hub_id=text)
    raise _missing(text)


# ----------------------------------------------------------------------------- readers


def _blocks(path: Path, opener: Opener | None) -> Iterator[tuple[bytes, int, int]]:
    """Yield (complete lines, offset of the block in the decompressed file, raw bytes read)."""
    with open(path, "rb") as raw:
        stream = opener(raw) if opener else raw
        offset, rest = 0, b""
        try:
            while True:
                data = stream.read(_BLOCK)
                if not data:
                    break
                data = rest + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no newline yet: keep reading
                    rest = data
                    continue
                yield data[:cut], offset, raw.tell()
                offset += cut
                rest = data[cut:]
            if rest:
                yield rest, offset, raw.tell()
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise ConfigError(
                f"{path}: cannot decompress ({e}); is it really a {path.suffix} file?"
            ) from None
        finally:
            if stream is not raw:
                stream.close()


def _decode(block: bytes, path: Path, offset: int) -> str:
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as e:
        where = "decompressed " if _file_format(path)[1] else ""
        raise ConfigError(
            f"{path}: not valid UTF-8 at {where}byte offset {offset + e.start} "
            f"(byte 0x{block[e.start]:02x}); re-save the file as UTF-8"
        ) from None


def _read_txt(path: Path, opener: Opener | None) -> Iterator[tuple[list[str], int]]:
    pending: list[str] = []
    size = 0
    for block, offset, done in _blocks(path, opener):
        size = offset + len(block)
        parts = _decode(block, path, offset).split(SEPARATOR)
        pending.append(parts[0])
        if len(parts) == 1:
            continue
        stories = ["".join(pending).strip()] + [p.strip() for p in parts[1:-1]]
        pending = [parts[-1]]
        yield [s for s in stories if s], done
    last = "".join(pending).strip()
    if size == 0:
        raise ConfigError(f"{path}: the file is empty; point data.path at the stories")
    yield ([last] if last else []), os.path.getsize(path)


def _read_jsonl(path: Path, opener: Opener | None, text_field: str,
                ) -> Iterator[tuple[list[str], int]]:
    line_no, size = 0, 0
    for block, offset, done in _blocks(path, opener):
        size = offset + len(block)
        lines = _decode(block, path, offset).split("\n")
        if lines[-1] == "":
            lines.pop()  # the block ends with a newline
        stories = []
        for line in lines:
            line_no += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{path}:{line_no}: not valid JSON ({e.msg}); a .jsonl file holds one JSON "
                    "object per line"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else "not an object"
                raise ConfigError(
                    f"{path}:{line_no}: no {text_field!r} field (keys: {keys}); set "
                    "data.text_field to the field holding the story"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise ConfigError(
                    f"{path}:{line_no}: field {text_field!r} is {type(text).__name__}, not text"
                )
            stories.append(text.strip())
        yield [s for s in stories if s], done
    if size == 0:
        raise ConfigError(f"{path}: the file is empty; point data.path at the stories")


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[list[str], int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise ConfigError(f"{path} is not a parquet file ({str(e).strip()[:80]})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise ConfigError(
            f"{path}: no {text_field!r} column (columns: {', '.join(columns)}); set "
            "data.text_field to the column holding the story"
        )
    rows, total, size = 0, max(parquet.metadata.num_rows, 1), os.path.getsize(path)
    for batch in parquet.iter_batches(batch_size=_CHUNK, columns=[text_field]):
        texts = batch.column(0).to_pylist()
        rows += len(texts)
        stories = [t.strip() for t in texts if isinstance(t, str)]
        yield [s for s in stories if s], int(size * rows / total)


def _read_hub(source: Source, text_field: str, max_stories: int | None,
              ) -> Iterator[tuple[list[str], int, int]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "reading a hub dataset needs `datasets` (pip install datasets); or set data.path to "
            "local files"
        ) from None
    split = source.split if max_stories is None else f"{source.split}[:{max_stories}]"
    try:
        ds = datasets.load_dataset(source.hub_id, split=split)
    except Exception as e:  # offline, unknown id, unknown split: all user-fixable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(
            f"cannot load hub dataset {source.hub_id!r} split {source.split!r} ({first}); "
            "offline or no such dataset: set data.path to local files (.txt/.txt.xz/.jsonl/"
            ".parquet or a directory of them)"
        ) from None
    if text_field not in ds.column_names:
        raise ConfigError(
            f"hub dataset {source.hub_id}: no {text_field!r} column (columns: "
            f"{', '.join(ds.column_names)}); set data.text_field"
        )
    rows = 0
    for batch in ds.iter(batch_size=_CHUNK):
        texts = batch[text_field]
        rows += len(texts)
        # empty rows are kept (as "") so record i is hub row i, as in the reference
        yield [t.strip() if isinstance(t, str) else "" for t in texts], rows, len(ds)


def iter_story_chunks(source: Source, text_field: str = "text", max_stories: int | None = None,
                      ) -> Iterator[tuple[list[str], float, float]]:
    """Yield (stories, work done, work total) in source order, at most ``max_stories`` stories.

    Stories from files are never empty; hub rows may be "" (kept so indices match the hub's).
    """
    remaining = max_stories if max_stories is not None else -1
    if source.hub_id is not None:
        for stories, done, total in _read_hub(source, text_field, max_stories):
            yield stories, done, total
        return
    sizes = [f.stat().st_size for f in source.files]
    total, before = float(sum(sizes) or 1), 0
    for path, size in zip(source.files, sizes):
        kind, opener = _file_format(path)
        if kind == "parquet":
            reader = _read_parquet(path, text_field)
        elif kind == "jsonl":
            reader = _read_jsonl(path, opener, text_field)
        else:
            reader = _read_txt(path, opener)
        for stories, done in reader:
            if remaining >= 0:
                stories = stories[:remaining]
                remaining -= len(stories)
            yield stories, before + done, total
            if remaining == 0:
                return
        before += size


def load_stories(source: str | os.PathLike, split: str = "train", text_field: str = "text",
                 max_stories: int | None = None) -> list[str]:
    """All non-empty stories of ``split`` of ``source`` (a path or hub id), stripped, in order."""
    src = resolve_source(source, split)
    stories = [s for chunk, _, _ in iter_story_chunks(src, text_field, max_stories)
               for s in chunk if s]
    if not stories:
        raise ConfigError(f"{src.label()}: no stories found; point data.path at the stories")
    return stories
