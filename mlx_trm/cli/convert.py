"""Convert between the reference's PyTorch checkpoints and model directories.

    mlx_trm.convert --torch-to-mlx runs/.../step_N.pt OUT_DIR [--tokenizer PATH]
    mlx_trm.convert --mlx-to-torch MODEL_DIR OUT.pt

The conversion itself (names, layouts, what the reference's loaders need) is
``mlx_trm.interop.convert``.
"""

from __future__ import annotations

import argparse

from ..config import cli_errors


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``mlx_trm.convert`` (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(
        prog="mlx_trm.convert",
        description="Convert reference PyTorch checkpoints to mlx-trm model directories and back.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--torch-to-mlx", nargs=2, metavar=("CHECKPOINT.pt", "OUT_DIR"))
    group.add_argument("--mlx-to-torch", nargs=2, metavar=("MODEL_DIR", "OUT.pt"))
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to store with a converted model (path, or gpt-neo-10k)")
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from ..interop.convert import TOKENIZER_HINT, mlx_to_torch, torch_to_mlx  # after parsing

    if args.torch_to_mlx:
        src, dst = args.torch_to_mlx
        out = torch_to_mlx(src, dst, args.tokenizer)
        print(f"wrote {out}")
        if args.tokenizer is None:
            print(f"note: no tokenizer stored (the reference used gpt-neo-10k); {TOKENIZER_HINT}")
    else:
        src, dst = args.mlx_to_torch
        print(f"wrote {mlx_to_torch(src, dst)}")


if __name__ == "__main__":
    main()
