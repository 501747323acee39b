"""The neural engine's tokenizers: bytes (ours and GPT-2's order), a tokenizer.json, and
incremental decoding that never splits a character."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quart_service.engines.neural.engine import load_tokenizer
from quart_service.engines.neural.tokenizer import (
    ByteTokenizer,
    JsonTokenizer,
    Tokenizer,
    gpt2_byte_order,
)
from quart_service.errors import EngineError

MIXED = "naïve café — 東京 🚀 Zürich\n\ttab"


def _pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.decoder()
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("order", ["identity", "gpt2"])
def test_bytes_round_trip_with_multibyte_characters_split_across_tokens(order: str) -> None:
    tokenizer = ByteTokenizer(order)  # type: ignore[arg-type]
    ids = tokenizer.encode(MIXED)
    assert len(ids) == len(MIXED.encode())  # one token per byte
    assert all(0 <= i < 256 for i in ids)
    pieces = _pieces(tokenizer, ids)
    assert "".join(pieces) == MIXED
    # The rocket is 4 bytes: 3 tokens give nothing, the 4th the whole character.
    start = MIXED.encode().index("🚀".encode())
    assert pieces[start : start + 4] == ["", "", "", "🚀"]
    assert "\ufffd" not in "".join(pieces)


@given(st.text())
def test_any_text_round_trips_through_bytes(text: str) -> None:
    tokenizer = ByteTokenizer()
    assert "".join(_pieces(tokenizer, tokenizer.encode(text))) == text


def test_gpt2_byte_tokens_are_gpt2s_ids() -> None:
    order = gpt2_byte_order()
    assert sorted(order) == list(range(256))
    tokenizer = ByteTokenizer("gpt2")
    # From GPT-2's encoder.json: "!" is 0, "Ġ" (a space) 220, "Ċ" (a newline) 198.
    assert tokenizer.encode("! \n") == [0, 220, 198]
    assert tokenizer.bos_id == 198
    assert ByteTokenizer().encode("! \n") == [33, 32, 10]


def test_an_incomplete_character_at_the_end_becomes_a_replacement() -> None:
    tokenizer = ByteTokenizer()
    decoder = tokenizer.decoder()
    assert decoder.feed(0xE6) == ""  # the first of three bytes
    assert decoder.flush() == "\ufffd"
    assert tokenizer.decoder().feed(300) == ""  # a larger vocabulary's non-byte id


def test_the_tokenizer_parameter(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(None, {"tokenizer": "bytes"}), ByteTokenizer)
    default = load_tokenizer(None, {"format": "pt"})  # a real GPT-2 file
    assert isinstance(default, ByteTokenizer)
    assert default.order == "gpt2"
    with pytest.raises(EngineError, match="tokenizer"):
        load_tokenizer("sentencepiece", {})
    with pytest.raises(EngineError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "missing.json"), {})


def test_a_tokenizer_json_decodes_incrementally(tmp_path: Path) -> None:
    """GPT-2's kind of tokenizer (byte-level BPE), trained here on a little text."""
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([MIXED * 3, "the people, by the people, for the people"], trainer)
    path = tmp_path / "tokenizer.json"
    bpe.save(str(path))
    tokenizer = load_tokenizer(str(path), {})
    assert isinstance(tokenizer, JsonTokenizer)
    assert tokenizer.eos_id == 0
    assert tokenizer.bos_id == 0
    assert tokenizer.vocab_size <= 400
    text = "the people 🚀 東京, naïve"
    ids = tokenizer.encode(text)
    assert len(ids) < len(text.encode())  # merges happened
    pieces = _pieces(tokenizer, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    long_text = "for the people " * 40  # longer than the decoder's window
    assert "".join(_pieces(tokenizer, tokenizer.encode(long_text))) == long_text
