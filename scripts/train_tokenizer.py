"""Train the project's SentencePiece BPE on TinyStories text.

The packaged default was made with (from the project root)::

    python scripts/train_tokenizer.py --data mlx_trm/assets/tinystories/train.txt.xz \
        --vocab-size 10000 --out mlx_trm/assets/tokenizer/tokenizer.model

Deterministic: the same stories in the same order give a byte-identical model (the trainer
settings are ``mlx_trm.data.tokenizer.SPM_TRAINER_OPTIONS``). ``--data`` takes anything
``data.path`` takes (file, directory, hub id); only its train split is read.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

try:
    import mlx_trm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_trm.config import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="stories: file, directory or hub id")
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--out", default="mlx_trm/assets/tokenizer/tokenizer.model")
    parser.add_argument("--text-field", default="text", help="jsonl/parquet/hub text field")
    parser.add_argument("--max-stories", type=int, default=None,
                        help="train on the first N stories only (for very large corpora)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from mlx_trm.data.sources import load_stories
        from mlx_trm.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
        from mlx_trm.files import atomic_write

        start = time.perf_counter()
        stories = load_stories(args.data, "train", args.text_field, args.max_stories)
        read_s = time.perf_counter() - start
        model = train_sentencepiece(stories, vocab_size=args.vocab_size)
        train_s = time.perf_counter() - start - read_s
        tok = SentencePieceTokenizer(model, source=args.out)
        bad = sum(tok.decode(ids) != s for s, ids in zip(stories, tok.encode_batch(stories)))
        out = Path(args.out)
        atomic_write(out, model)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_tokens = sum(map(len, tok.encode_batch(stories)))
    print(f"stories        {len(stories):,} ({sum(map(len, stories)):,} characters)")
    print(f"vocabulary     {tok.vocab_size:,} pieces (id 0 = {tok.id_to_piece(0)})")
    print(f"tokens         {n_tokens:,} ({sum(map(len, stories)) / n_tokens:.2f} characters/token)")
    print(f"round trip     {len(stories) - bad:,}/{len(stories):,} stories exact")
    print(f"time           read {read_s:.2f} s, train {train_s:.2f} s")
    print(f"wrote          {out} ({out.stat().st_size:,} bytes, sha256 "
          f"{hashlib.sha256(model).hexdigest()[:16]}, name {tok.name})")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
