"""Load a checkpoint written by ``mlx_trm.convert --mlx-to-torch`` with the reference's own loaders
and continue a prompt with the reference's own generation loop.

    mlx_trm.convert --mlx-to-torch runs/x/model runs/x.pt
    REF_REPO=/path/to/TinyRecursiveModels python scripts/reference_generate.py runs/x.pt \\
        --prompt "Once upon a time" --max-tokens 20

REF_REPO is a checkout of jhspaybar/TinyRecursiveModels; run this with a Python that has torch,
pydantic and einops (and mlx-trm, for a SentencePiece tokenizer). The checkpoint is loaded three
ways, each checked strictly (no missing and no unexpected key): ``generate_stories._load_model``,
``sweep_generation._load_model``, and ``pretrain_text``'s ``PretrainConfig(**config)`` +
``create_model``. Then ``generate_stories.generate_story`` runs greedily (temperature 0) on the
first model; prints one JSON line: the new token ids and their text.

Tokenizers: the reference knows t5-small, gpt-neo-125M and gpt-neo-10k (those names go to it
unchanged). For the converter's ``mlx-trm-sentencepiece:FILE`` its ``get_tokenizer_for_dataset``
is given mlx-trm's SentencePiece tokenizer from FILE (beside the checkpoint; id 0 = pad = eos);
without this script the reference stops at that name with ``Unknown tokenizer``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_reference_fixtures import import_reference  # noqa: E402

SPM_MARKER = "mlx-trm-sentencepiece:"  # as mlx_trm.convert writes it


class SentencePieceForReference:
    """mlx-trm's tokenizer with the attributes the reference's scripts read."""

    pad_token_id = eos_token_id = 0

    def __init__(self, path: Path):
        from mlx_trm.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(path)
        self.vocab_size = self.tokenizer.vocab_size
        self.last_decoded: list[int] = []

    def encode(self, text: str, **kwargs) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids, **kwargs) -> str:
        self.last_decoded = [int(i) for i in ids]
        return self.tokenizer.decode(self.last_decoded)


def give_tokenizers(ref, checkpoint_dir: Path) -> dict:
    """Route the SentencePiece marker to mlx-trm's tokenizer in both generation scripts."""
    made: dict = {}
    original = ref.gs.get_tokenizer_for_dataset

    def get_tokenizer_for_dataset(dataset_name, tokenizer_override=None):
        if tokenizer_override and tokenizer_override.startswith(SPM_MARKER):
            path = checkpoint_dir / tokenizer_override[len(SPM_MARKER):]
            made.setdefault(path, SentencePieceForReference(path))
            return made[path]
        return original(dataset_name, tokenizer_override)

    ref.gs.get_tokenizer_for_dataset = get_tokenizer_for_dataset
    ref.sweep.get_tokenizer_for_dataset = get_tokenizer_for_dataset
    return made


def load_three_ways(ref, path: Path, state: dict):
    """The reference's three loaders; each model then strictly loads the state dict."""
    import torch

    cpu = torch.device("cpu")
    model, tokenizer, config = ref.gs._load_model(path, cpu)
    swept, _, _ = ref.sweep._load_model(path, cpu)
    pretrain_config = ref.pt.PretrainConfig(**config)
    metadata = ref.Metadata(pad_id=0, vocab_size=tokenizer.vocab_size,
                            seq_len=pretrain_config.seq_len)
    trained, _, _ = ref.pt.create_model(pretrain_config, metadata, cpu, 1)
    for name, m in (("generate_stories", model), ("sweep_generation", swept),
                    ("pretrain_text", trained)):
        result = m.load_state_dict(state, strict=True)  # raises on any missing/unexpected key
        assert not result.missing_keys and not result.unexpected_keys, name
    return model, tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a .pt written by mlx_trm.convert")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=20)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ref_dir = os.environ.get("REF_REPO")
    if not ref_dir:
        raise SystemExit("error: set REF_REPO to a checkout of jhspaybar/TinyRecursiveModels")
    import torch

    torch.set_num_threads(1)
    ref = import_reference(os.path.abspath(ref_dir))
    import sweep_generation

    ref.sweep = sweep_generation
    give_tokenizers(ref, args.checkpoint.resolve().parent)
    state = torch.load(args.checkpoint, map_location="cpu")["model_state_dict"]
    model, tokenizer = load_three_ways(ref, args.checkpoint, state)
    text = ref.gs.generate_story(model, tokenizer, args.prompt, args.max_tokens, 0.0, 0,
                                 torch.device("cpu"))
    ids = getattr(tokenizer, "last_decoded", None)
    print(json.dumps({"ids": ids, "text": text, "tokenizer": type(tokenizer).__name__}))


if __name__ == "__main__":
    main()
