"""Story sources, the token cache and the reference's batches."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlx_trm.data.batches as data
import mlx_trm.data.sources as sources
from mlx_trm.config import ConfigError, DataConfig
from mlx_trm.data.batches import (
    IGNORE_INDEX,
    TokenDataset,
    default_cache_dir,
    epoch_order,
    eval_batches,
    iterate_batches,
    load_split,
    load_tokens,
    num_batches,
    stream_batches,
    token_stats,
    tokenize_stories,
)
from mlx_trm.data.sources import load_stories, resolve_source
from mlx_trm.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STORIES = ["One day, Tom saw a dog.\nThe dog was big.", "Lily had a red ball.",
           "The sun was hot. “Let's swim!” said Sue.", "Ben ran – fast – to the café."]


class DigitTokenizer:
    """Text "3 4 5" -> [3, 4, 5]: batches can be checked number by number."""

    name = "digits"
    eos_id = 0
    vocab_size = 60_000

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


def digit_dataset(lengths: list[int]) -> TokenDataset:
    """Story i is the tokens 100*(i+1) + j, j < lengths[i] < 100 (0: an empty story)."""
    stories = [" ".join(str(100 * (i + 1) + j) for j in range(n)) for i, n in enumerate(lengths)]
    return tokenize_stories(stories, DigitTokenizer())


def write_txt(path: Path, stories: list[str], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for s in stories:
            f.write(s + "\n<|endoftext|>\n")
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


# ----------------------------------------------------------------------------- sources


def test_sample_directory_splits(tinystories_dir):
    train = load_stories(tinystories_dir)
    valid = load_stories(tinystories_dir, "validation")
    assert (len(train), len(valid)) == (5978, 1477)
    assert train[0].startswith("One day, a little girl named Lily found a needle in her room.")
    assert valid[0].startswith("Once upon a time there was a little boy named Ben.")
    assert all(s == s.strip() and "<|endoftext|>" not in s for s in train)
    assert any("\n" in s for s in train)  # paragraphs survive
    # a single train file finds its valid sibling; a file named as data.path is read as is
    assert load_stories(tinystories_dir / "train.txt.xz", "validation") == valid
    assert load_stories(tinystories_dir / "valid.txt.xz") == valid
    assert load_stories(tinystories_dir, "valid", max_stories=5) == valid[:5]


def test_the_shipped_sample_by_name_from_any_directory(tmp_path, monkeypatch):
    """data.path=tinystories-sample reads the package's copy wherever the run starts, unless
    a local file or folder of that name exists (then that one is meant)."""
    monkeypatch.chdir(tmp_path)
    train = resolve_source(sources.SAMPLE)
    assert train.files == (sources.SAMPLE_DIR / "train.txt.xz",)
    assert resolve_source(sources.SAMPLE, "validation").files == (
        sources.SAMPLE_DIR / "valid.txt.xz",)
    assert load_stories(sources.SAMPLE, "validation", max_stories=2)[0].startswith(
        "Once upon a time there was a little boy named Ben.")
    (tmp_path / sources.SAMPLE).mkdir()
    write_txt(tmp_path / sources.SAMPLE / "train.txt", STORIES)
    assert resolve_source(sources.SAMPLE).files == (Path(sources.SAMPLE) / "train.txt",)


def test_quickstart_config_needs_nothing_beside_the_package():
    from mlx_trm.config import load_config
    from tests.conftest import CONFIGS

    config = load_config(CONFIGS / "quickstart.yaml")
    assert config.data.path == sources.SAMPLE
    assert resolve_source(config.data.path).files[0].is_relative_to(sources.SAMPLE_DIR)


def test_every_file_format_reads_the_same_stories(tmp_path):
    files = [write_txt(tmp_path / "a.txt", STORIES),
             write_txt(tmp_path / "a.txt.gz", STORIES, gzip.open),
             write_txt(tmp_path / "a.txt.xz", STORIES, lzma.open),
             write_txt(tmp_path / "a.txt.bz2", STORIES, bz2.open),
             write_txt(tmp_path / "plain.gz", STORIES, gzip.open)]
    lines = "".join(json.dumps({"id": i, "text": s}) + "\n" for i, s in enumerate(STORIES))
    (tmp_path / "a.jsonl").write_text(lines + "\n")  # a blank line is ignored
    (tmp_path / "b.jsonl.xz").write_bytes(lzma.compress(lines.encode()))
    files += [tmp_path / "a.jsonl", tmp_path / "b.jsonl.xz"]
    pq = pytest.importorskip("pyarrow.parquet", reason="parquet needs pyarrow")
    import pyarrow as pa

    pq.write_table(pa.table({"story": STORIES, "n": list(range(4))}), tmp_path / "a.parquet")
    for path in files:
        assert load_stories(path) == STORIES, path
    assert load_stories(tmp_path / "a.parquet", text_field="story") == STORIES


def test_txt_separators(tmp_path):
    (tmp_path / "inline.txt").write_text("  first story <|endoftext|>second\n\n<|endoftext|>"
                                         "\n<|endoftext|>third")
    assert load_stories(tmp_path / "inline.txt") == ["first story", "second", "third"]
    (tmp_path / "one.txt").write_text("No separator.\nStill one story.\n")
    assert load_stories(tmp_path / "one.txt") == ["No separator.\nStill one story."]


def test_large_text_file_is_read_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_BLOCK", 64)  # many blocks, stories across block edges
    stories = [f"Story {i}: " + "word " * (i % 30) + "é." for i in range(200)]
    assert load_stories(write_txt(tmp_path / "many.txt.xz", stories, lzma.open)) == stories
    lines = "".join(json.dumps({"text": s}) + "\n" for s in stories)
    (tmp_path / "many.jsonl").write_text(lines)
    assert load_stories(tmp_path / "many.jsonl") == stories


def test_directory_split_rules(tmp_path):
    tagged = tmp_path / "tagged"
    (tagged / "validation").mkdir(parents=True)
    write_txt(tagged / "stories-train-00.txt", STORIES[:2])
    write_txt(tagged / "stories-train-01.txt.gz", STORIES[2:], gzip.open)
    write_txt(tagged / "validation" / "part.txt", ["A valid story."])
    (tagged / "README.md").write_text("not data")
    (tagged / ".hidden.txt").write_text("not data either")
    assert load_stories(tagged) == STORIES  # sorted by path, the two train files
    assert load_stories(tagged, "validation") == ["A valid story."]
    with pytest.raises(ConfigError, match="no test files"):
        load_stories(tagged, "test")

    plain = tmp_path / "plain"
    plain.mkdir()
    write_txt(plain / "a.txt", STORIES[:1])
    write_txt(plain / "b.txt", STORIES[1:])
    assert load_stories(plain) == STORIES
    with pytest.raises(ConfigError, match="data.valid_path"):
        load_stories(plain, "validation")
    with pytest.raises(ConfigError, match="data.valid_path"):
        load_stories(plain / "a.txt", "validation")
    source = resolve_source(plain, "validation", valid_path=plain / "b.txt")
    assert source.files == (plain / "b.txt",)
    assert resolve_source(plain, "train", valid_path=plain / "b.txt").files == (
        plain / "a.txt", plain / "b.txt")
    with pytest.raises(ConfigError, match="unknown split"):
        resolve_source(plain, "dev-set")


def test_hub_id_is_recognised_without_importing_datasets():
    source = resolve_source("roneneldan/TinyStories", "validation")
    assert source.hub_id == "roneneldan/TinyStories" and source.split == "validation"
    code = ("import sys, mlx_trm.data.batches, mlx_trm.data.tokenizer; "
            "assert 'datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------- bad input


def test_missing_path():
    with pytest.raises(ConfigError, match="does not exist; set data.path"):
        load_stories("no/such/stories.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_stories("./nowhere")


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.txt.gz"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(b""))
    else:
        path.write_bytes(b"")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_stories(path)


def test_file_with_only_separators_has_no_stories(tmp_path):
    (tmp_path / "seps.txt").write_text("<|endoftext|>\n\n<|endoftext|>\n")
    with pytest.raises(ConfigError, match="no stories found"):
        load_stories(tmp_path / "seps.txt")


def test_undecodable_bytes_name_file_and_offset(tmp_path):
    raw = b"Good story.\n<|endoftext|>\nBad " + b"\xff\xfe" + b" story.\n"
    (tmp_path / "bad.txt").write_bytes(raw)
    with pytest.raises(ConfigError, match=r"bad.txt: not valid UTF-8 at byte offset 30 "):
        load_stories(tmp_path / "bad.txt")
    (tmp_path / "bad.txt.xz").write_bytes(lzma.compress(raw))
    with pytest.raises(ConfigError, match="decompressed byte offset 30"):
        load_stories(tmp_path / "bad.txt.xz")


def test_corrupt_or_unsupported_files(tmp_path):
    (tmp_path / "fake.txt.xz").write_bytes(b"not xz at all")
    with pytest.raises(ConfigError, match="cannot decompress"):
        load_stories(tmp_path / "fake.txt.xz")
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(ConfigError, match="unsupported file type"):
        load_stories(tmp_path / "notes.md")
    (tmp_path / "fake.parquet").write_text("not parquet")
    pytest.importorskip("pyarrow", reason="parquet needs pyarrow")
    with pytest.raises(ConfigError, match="is not a parquet file"):
        load_stories(tmp_path / "fake.parquet")


def test_jsonl_problems(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok"}\n{"story": "x", "id": 3}\n')
    with pytest.raises(ConfigError, match=r"s.jsonl:2: no 'text' field \(keys: story, id\); "
                                          "set data.text_field"):
        load_stories(path)
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ConfigError, match="s.jsonl:2: not valid JSON"):
        load_stories(path)
    path.write_text('{"text": 5}\n')
    with pytest.raises(ConfigError, match="is int, not text"):
        load_stories(path)


def test_parquet_without_the_column(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="parquet needs pyarrow")
    import pyarrow as pa

    pq.write_table(pa.table({"story": ["a"]}), tmp_path / "s.parquet")
    with pytest.raises(ConfigError, match=r"no 'text' column \(columns: story\)"):
        load_stories(tmp_path / "s.parquet")


def test_offline_hub_id_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), MLX_TRM_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, "scripts/prepare_data.py", "--data", "roneneldan/TinyStories",
         "--split", "validation"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "roneneldan/TinyStories" in result.stderr and "data.path" in result.stderr


# ----------------------------------------------------------------------------- token cache


def test_cache_layout_and_reuse(tmp_path, tok, monkeypatch):
    path = write_txt(tmp_path / "s.txt", STORIES)
    ds = load_tokens(path, tok, cache_dir=tmp_path / "cache")
    assert isinstance(ds.tokens, np.memmap) and ds.tokens.dtype == np.uint16
    assert ds.path.parent == tmp_path / "cache" and ds.meta["tokenizer"] == tok.name
    assert len(ds) == ds.n_stories == 4
    for i, story in enumerate(STORIES):
        assert ds.story(i).tolist() == tok.encode(story) + [0]
    assert not list((tmp_path / "cache").glob(".tmp*"))

    # a second run reads nothing and tokenizes nothing
    monkeypatch.setattr(data, "_tokenize_into", lambda *a, **k: pytest.fail("re-tokenized"))
    monkeypatch.setattr(data, "iter_story_chunks", lambda *a, **k: pytest.fail("re-read"))
    again = load_tokens(path, tok, cache_dir=tmp_path / "cache")
    assert again.path == ds.path and np.array_equal(again.tokens, ds.tokens)
    monkeypatch.undo()

    # a changed file, another tokenizer, another max_stories: other entries
    time.sleep(0.01)
    write_txt(path, STORIES[:3])
    changed = load_tokens(path, tok, cache_dir=tmp_path / "cache")
    assert changed.path != ds.path and changed.n_stories == 3
    digits_file = write_txt(tmp_path / "d.txt", ["1 2 3", "4 5"])
    by_digits = load_tokens(digits_file, DigitTokenizer(), cache_dir=tmp_path / "cache")
    by_spm = load_tokens(digits_file, tok, cache_dir=tmp_path / "cache")
    assert by_digits.path != by_spm.path and by_digits.tokens.tolist() == [1, 2, 3, 0, 4, 5, 0]
    limited = load_tokens(path, tok, cache_dir=tmp_path / "cache", max_stories=1)
    assert limited.n_stories == 1 and limited.path != changed.path
    assert len(list((tmp_path / "cache").iterdir())) == 5


def test_cache_location(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("MLX_TRM_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env" / "tokens"
    path = write_txt(tmp_path / "s.txt", STORIES)
    assert load_tokens(path, tok).path.parent == tmp_path / "env" / "tokens"
    config = DataConfig(path=str(path), cache_dir=str(tmp_path / "cfg"))
    assert load_split(config, "train", tok).path.parent == tmp_path / "cfg"
    monkeypatch.delenv("MLX_TRM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "mlx_trm" / "tokens"


def test_failed_tokenization_leaves_no_entry(tmp_path, tok):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n<|endoftext|>\n\xc3(\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_tokens(bad, tok, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_load_split_uses_valid_path(tmp_path, tok):
    write_txt(tmp_path / "train.txt", STORIES[:3])
    write_txt(tmp_path / "heldout.txt", STORIES[3:])
    config = DataConfig(path=str(tmp_path / "train.txt"), valid_path=str(tmp_path / "heldout.txt"),
                        cache_dir=str(tmp_path / "cache"))
    assert load_split(config, "train", tok).n_stories == 3
    valid = load_split(config, "validation", tok)
    assert valid.n_stories == 1 and tok.decode(valid.story(0)) == STORIES[3]


def test_sample_tokenizes_fast_and_round_trips(tinystories_dir, tok, tmp_path):
    start = time.perf_counter()
    ds = load_tokens(tinystories_dir, tok, cache_dir=tmp_path)
    seconds = time.perf_counter() - start
    assert ds.n_stories == 5978 and seconds < 30
    valid = load_tokens(tinystories_dir, tok, split="validation", cache_dir=tmp_path)
    stories = load_stories(tinystories_dir, "validation")
    assert [tok.decode(valid.story(i)) for i in range(len(valid))] == stories
    assert all(valid.story(i)[-1] == 0 and 0 not in valid.story(i)[:-1] for i in range(50))


def test_empty_rows_keep_their_index():
    # like empty rows of the hub dataset: kept as empty records, never batched
    ds = tokenize_stories(["1 2", "", "3", ""], DigitTokenizer())
    assert ds.lengths.tolist() == [3, 0, 2, 0] and len(ds) == 4 and ds.n_stories == 2
    order = epoch_order(ds, seed=0, epoch=1)
    assert sorted(order.tolist()) == [0, 2]
    inputs, labels = next(iterate_batches(ds, 8, 4))
    assert inputs.shape == (2, 4)


def test_token_stats():
    ds = digit_dataset([3, 10, 1])
    stats = token_stats(ds, seq_len=4)  # rows of 5: [3+eos, 4 pad... ]
    assert stats["stories"] == 3 and stats["tokens"] == 14
    assert stats["tokens_per_story_max"] == 10 and stats["tokens_per_story_median"] == 3
    assert stats["truncated"] == 1
    assert stats["padding_fraction"] == pytest.approx(1 - (4 + 5 + 2) / 15)
    assert stats["masked_label_fraction"] == pytest.approx(1 - (2 + 4 + 0) / 12)


# ----------------------------------------------------------------------------- batches


def reference_rows(ds: TokenDataset, indices, seq_len: int) -> np.ndarray:
    """§10 literally: story + eos, truncate to seq_len + 1, right-pad with 0."""
    rows = []
    for i in indices:
        row = ds.story(int(i)).astype(np.int32)[: seq_len + 1]
        rows.append(np.pad(row, (0, seq_len + 1 - len(row))))
    return np.stack(rows)


def test_batches_match_the_reference_literally():
    lengths = [int(n) for n in np.random.default_rng(0).integers(1, 40, size=50)]
    ds = digit_dataset(lengths)
    order = epoch_order(ds, seed=42, epoch=1)
    # the reference: numpy Generator(Philox(seed + epoch)).permutation(arange(N))
    assert order.tolist() == np.random.Generator(np.random.Philox(43)).permutation(50).tolist()
    batches = list(iterate_batches(ds, 8, 16, seed=42, epoch=1))
    assert [b[0].shape for b in batches] == [(8, 16)] * 6 + [(2, 16)]  # remainder batch
    for b, (inputs, labels) in enumerate(batches):
        rows = reference_rows(ds, order[8 * b: 8 * b + 8], 16)
        assert inputs.dtype == labels.dtype == np.int32
        assert np.array_equal(inputs, rows[:, :-1])
        assert np.array_equal(labels, np.where(rows[:, 1:] == 0, IGNORE_INDEX, rows[:, 1:]))
    # long stories are cut to seq_len + 1 tokens (their end-of-story is lost), short ones padded
    long_row = reference_rows(ds, [int(np.argmax(lengths))], 16)[0]
    assert 0 not in long_row


def test_max_sequences_subsample_is_the_references():
    ds = digit_dataset([5] * 100)
    base = np.random.Generator(np.random.Philox(7)).choice(100, size=30, replace=False)
    for epoch in (1, 2, 3):
        expected = np.random.Generator(np.random.Philox(7 + epoch)).permutation(base)
        assert epoch_order(ds, seed=7, epoch=epoch, max_sequences=30).tolist() == expected.tolist()
    assert len(epoch_order(ds, seed=7, epoch=1, max_sequences=10**6)) == 100
    assert num_batches(ds, 8, 16, seed=7, max_sequences=30) == 4
    assert num_batches(ds, 8, 16, seed=7, max_sequences=30, drop_remainder=True) == 3


def test_determinism_and_epoch_reshuffle():
    ds = digit_dataset([3 + i % 7 for i in range(40)])

    def epoch_inputs(seed, epoch):
        return np.concatenate([x for x, _ in iterate_batches(ds, 8, 12, seed=seed, epoch=epoch)])

    assert np.array_equal(epoch_inputs(1, 1), epoch_inputs(1, 1))
    first, second = epoch_inputs(1, 1), epoch_inputs(1, 2)
    assert not np.array_equal(first, second)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, second.tolist()))
    assert not np.array_equal(first, epoch_inputs(2, 1))


def test_drop_remainder_and_resume():
    ds = digit_dataset([4] * 21)
    full = list(iterate_batches(ds, 4, 8, seed=3, epoch=2))
    assert [x.shape[0] for x, _ in full] == [4, 4, 4, 4, 4, 1]
    assert len(list(iterate_batches(ds, 4, 8, seed=3, epoch=2, drop_remainder=True))) == 5
    resumed = list(iterate_batches(ds, 4, 8, seed=3, epoch=2, start_batch=3))
    assert len(resumed) == 3
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(full[3:], resumed))

    stream = stream_batches(ds, 4, 8, seed=3, start_epoch=2, start_batch=5)
    positions = [next(stream)[:2] for _ in range(8)]
    assert positions == [(2, 5), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4), (3, 5), (4, 0)]
    epoch, index, inputs, _ = next(stream_batches(ds, 4, 8, seed=3, start_epoch=3, start_batch=2))
    assert (epoch, index) == (3, 2)
    assert np.array_equal(inputs, list(iterate_batches(ds, 4, 8, seed=3, epoch=3))[2][0])
    with pytest.raises(ConfigError, match="no batch of 64"):
        next(stream_batches(ds, 64, 8, drop_remainder=True))


def test_eval_batches_are_fixed():
    ds = digit_dataset([6] * 30)
    a = eval_batches(ds, 4, 8, n_batches=3)
    b = eval_batches(ds, 4, 8, n_batches=3)
    assert len(a) == 3 and all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    first = np.random.Generator(np.random.Philox(43)).permutation(30)[:4]
    assert np.array_equal(a[0][0], reference_rows(ds, first, 8)[:, :-1])
    assert len(eval_batches(ds, 4, 8, n_batches=100)) == 8
    # the reference's eval set (its configs set max_sequences): choice with 42, permute with 43
    base = np.random.Generator(np.random.Philox(42)).choice(30, size=30, replace=False)
    first = np.random.Generator(np.random.Philox(43)).permutation(base)[:4]
    ref = eval_batches(ds, 4, 8, n_batches=1, max_sequences=2_100_000)
    assert np.array_equal(ref[0][0], reference_rows(ds, first, 8)[:, :-1])


def test_packing():
    lengths = [3, 9, 1, 14, 5, 2, 7]
    ds = digit_dataset(lengths)
    seq_len, order = 6, epoch_order(ds, seed=5, epoch=1)
    stream = np.concatenate([ds.story(i) for i in order]).astype(np.int32)
    batches = list(iterate_batches(ds, 2, seq_len, seed=5, epoch=1, packing=True))
    inputs = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    n_rows = -(-(len(stream) - 1) // seq_len)
    assert inputs.shape == (n_rows, seq_len)
    assert num_batches(ds, 2, seq_len, seed=5, packing=True) == len(batches) == -(-n_rows // 2)
    # rows tile the stream: every token is an input once and (but the first) a target once
    padded = np.pad(stream, (0, n_rows * seq_len + 1 - len(stream)))
    assert np.array_equal(inputs.ravel(), padded[:-1])
    targets = padded[1:]
    assert np.array_equal(labels.ravel(), np.where(targets == 0, IGNORE_INDEX, targets))
    # stories are separated by end-of-story, and a long story continues on the next row
    assert np.count_nonzero(stream == 0) == len(lengths)
    assert np.array_equal(inputs[1, 0:1], padded[seq_len:seq_len + 1])
    # packing off is the reference: one story per row
    assert sum(x.shape[0] for x, _ in iterate_batches(ds, 2, seq_len)) == len(lengths)


def test_packing_on_the_sample(tinystories_dir, tok, tmp_path):
    ds = load_tokens(tinystories_dir, tok, split="validation", cache_dir=tmp_path)
    packed = num_batches(ds, 64, 512, packing=True)
    plain = num_batches(ds, 64, 512)
    assert plain == 24 and packed < plain / 2  # 61% of a plain row is padding
    inputs, labels = next(iterate_batches(ds, 64, 512, packing=True, seed=1, epoch=1))
    assert inputs.shape == labels.shape == (64, 512)
    # a row's targets are its inputs shifted by one, then the next row's first input
    assert np.count_nonzero(inputs == 0) > 0
    assert np.array_equal(labels[:, :-1] == IGNORE_INDEX, inputs[:, 1:] == 0)
    assert np.array_equal(labels[:-1, -1] == IGNORE_INDEX, inputs[1:, 0] == 0)
    assert np.array_equal(labels[:, :-1][inputs[:, 1:] != 0], inputs[:, 1:][inputs[:, 1:] != 0])
