"""``mlx_trm.train --config configs/X.yaml [section.key=value ...]``: train (or resume) a run.

What a run does is ``mlx_trm.training.run``; this module parses the command line and renders what
stops a run as one line and an exit status (2 for bad settings and failed writes, 128 + the
signal's number for Ctrl-C and SIGTERM, after a save when training had begun).
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..config import cli_errors, load_config


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``mlx_trm.train`` (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(
        prog="mlx_trm.train", description="Train a tiny recursive language model.",
        epilog="Overrides: section.key=value, e.g. train.max_steps=200 data.path=stories.txt "
               "out_dir=runs/x train.resume=true")
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = load_config(args.config, args.overrides)
    try:
        from ..training.run import run  # mlx, mlx-lm, the model: after parsing, inside the try

        run(config, quiet=args.quiet)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM while the run was being set up
        print("error: interrupted before the first step; nothing was trained", file=sys.stderr)
        raise SystemExit(128 + getattr(e, "signum", signal.SIGINT)) from None
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # a write failed: the disk, permissions, a read-only mount
        print(f"error: {e.strerror or e} ({e.filename or config.out_dir}); the last checkpoint "
              "is intact: fix that, then resume with train.resume=true", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
