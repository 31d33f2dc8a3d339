"""``python -m mlx_trm.cli.interop DIR``: make a model directory written before the mlx-lm files
existed loadable by mlx-lm (``--trust-remote-code``)."""

from __future__ import annotations

import argparse
import json

from ..config import ConfigError, cli_errors


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m mlx_trm.cli.interop`` (the docs' commands are checked
    against it)."""
    parser = argparse.ArgumentParser(
        prog="python -m mlx_trm.cli.interop",
        description="Make an mlx-trm model directory loadable by mlx-lm (--trust-remote-code).")
    parser.add_argument("model", help="model directory (or a training run directory)")
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # the model and mlx-lm only after parsing: --help stays instant
    from ..checkpoint import load_dir_tokenizer, read_model_config, resolve_model_dir
    from ..checkpoint.mlx_lm_files import UNSUPPORTED_KEY, write_mlx_lm_files

    path = resolve_model_dir(args.model)
    _, raw = read_model_config(path)
    write_mlx_lm_files(path, raw, load_dir_tokenizer(path))
    if reason := json.loads((path / "config.json").read_text()).get(UNSUPPORTED_KEY):
        raise ConfigError(f"{path}: mlx-lm cannot serve it: {reason}")
    print(f"{path}: mlx-lm files written; try: mlx_lm.generate --model {path} "
          '--trust-remote-code --prompt "Once upon a time"')


if __name__ == "__main__":
    main()
