"""Tokenize a split into the token cache ahead of training, and summarise it.

    python scripts/prepare_data.py --data tinystories-sample --split train

Training and evaluation then find the tokens in the cache and never re-tokenize. The summary
counts text tokens (the end-of-story token each row gets is not included) and gives the share of
padding and of masked labels when every story is one row of ``seq_len + 1`` tokens (the
reference's batching).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import mlx_trm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table  # noqa: E402

from mlx_trm.config import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="file, directory or hub dataset id")
    parser.add_argument("--split", default="train", help="train, validation or test")
    parser.add_argument("--valid-path", default=None, help="validation stories (file or dir)")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece .model, model dir, tokenizer.json or gpt-neo-10k "
                             "(default: the packaged one)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--cache-dir", default=None,
                        help="token cache (default: $MLX_TRM_CACHE/tokens or "
                             "~/.cache/mlx_trm/tokens)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--max-stories", type=int, default=None)
    parser.add_argument("--rebuild", action="store_true", help="re-tokenize even if cached")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        from mlx_trm.data.batches import load_tokens, token_stats
        from mlx_trm.data.sources import resolve_source
        from mlx_trm.data.tokenizer import load_tokenizer

        if args.seq_len < 1:
            raise ConfigError(f"--seq-len must be >= 1 (got {args.seq_len})")
        tokenizer = load_tokenizer(args.tokenizer)
        source = resolve_source(args.data, args.split, valid_path=args.valid_path)
        columns = (TextColumn("[bold]{task.description}"), BarColumn(),
                   TextColumn("{task.percentage:>5.1f}%  {task.fields[stories]:,} stories"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True,
                      disable=not console.is_terminal) as bar:
            task = bar.add_task(f"tokenizing {source.label()}", total=None, stories=0)

            def progress(stories: int, done: float, total: float) -> None:
                bar.update(task, completed=done, total=total, stories=stories)

            start = time.perf_counter()
            dataset = load_tokens(source, tokenizer, text_field=args.text_field,
                                  max_stories=args.max_stories, cache_dir=args.cache_dir,
                                  rebuild=args.rebuild, progress=progress)
            seconds = time.perf_counter() - start
        tokenized = bar.tasks[0].fields["stories"] > 0  # False: the cache answered
        stats = token_stats(dataset, args.seq_len)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    table = Table(title=f"{source.label()} ({source.split}), tokenizer {tokenizer.name}",
                  show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    L = args.seq_len
    table.add_row("stories", f"{stats['stories']:,}")
    table.add_row("tokens", f"{stats['tokens']:,}")
    table.add_row("tokens/story mean, median, max",
                  f"{stats['tokens_per_story_mean']:.1f}, {stats['tokens_per_story_median']:.0f}"
                  f", {stats['tokens_per_story_max']:,}")
    table.add_row(f"padding at seq_len {L}", f"{stats['padding_fraction']:.1%}")
    table.add_row(f"masked labels at seq_len {L}", f"{stats['masked_label_fraction']:.1%}")
    table.add_row(f"truncated at seq_len {L}",
                  f"{stats['truncated']:,} ({stats['truncated'] / stats['stories']:.1%})")
    if tokenized:
        table.add_row("tokenize time", f"{seconds:.2f} s")
        table.add_row("throughput", f"{stats['stories'] / seconds:,.0f} stories/s")
        table.add_row("", f"{stats['tokens'] / seconds:,.0f} tokens/s")
    else:
        table.add_row("cache hit", f"{seconds * 1e3:.1f} ms (--rebuild to re-tokenize)")
    Console(width=max(Console().width, 100)).print(table)
    print(f"cache: {dataset.path or '(memory)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
