"""Tokenizers: byte-level (no files, no dependency) and, optionally, a ``tokenizer.json``.

:class:`ByteTokenizer` makes one token of every UTF-8 byte. Its ids are the bytes
themselves (``identity``: what a random model of any vocabulary of 256 or more uses),
or GPT-2's 256 single-byte tokens (``gpt2``: GPT-2's vocabulary begins with them, in
the order of its ``bytes_to_unicode`` table), so real GPT-2 weights read and write
valid tokens without any file, if without GPT-2's merges (so less fluently).

:class:`JsonTokenizer` loads a Hugging Face ``tokenizer.json`` (GPT-2's BPE, for one)
with the ``tokenizers`` package, installed separately.

Decoding is incremental: a token may end in the middle of a character (bytes of a
multi-byte UTF-8 sequence, or a BPE token holding part of one); the decoder holds it
back until the character is whole, so every piece it returns is valid text.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from ...errors import EngineError

__all__ = [
    "ByteTokenizer",
    "IncrementalDecoder",
    "JsonTokenizer",
    "Tokenizer",
    "gpt2_byte_order",
]


class IncrementalDecoder(Protocol):
    """Turns a stream of token ids into text pieces."""

    def feed(self, token_id: int) -> str:
        """The text completed by this token ('' while a character is incomplete)."""
        ...

    def flush(self) -> str:
        """What is held back at the end (an incomplete character becomes U+FFFD)."""
        ...


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Ids below this are tokens this tokenizer can decode (sampling is limited to them)."""
        ...

    @property
    def eos_id(self) -> int | None:
        """The end-of-text token, which ends a generation; None if there is none."""
        ...

    @property
    def bos_id(self) -> int:
        """The token an empty prompt starts from."""
        ...

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``."""
        ...

    def decoder(self) -> IncrementalDecoder:
        """A fresh incremental decoder."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (part of a character, maybe); b'' for none."""
        ...


def gpt2_byte_order() -> list[int]:
    """The byte of each of GPT-2's first 256 token ids (its ``bytes_to_unicode``):
    the printable bytes first, in order, then the others."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    return printable + [b for b in range(256) if b not in printable]


def _gpt2_alphabet() -> dict[str, int]:
    """GPT-2's byte alphabet (its ``bytes_to_unicode``, inverted): the character that
    spells each byte in its BPE vocabulary. Printable bytes spell themselves; the
    others, in order, are U+0100 onwards."""
    printable = set(gpt2_byte_order()[:188])
    alphabet: dict[str, int] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + extra)] = byte
            extra += 1
    return alphabet


_GPT2_BYTE = _gpt2_alphabet()


class _ByteDecoder:
    __slots__ = ("_bytes", "_utf8")

    def __init__(self, id_to_byte: Sequence[int]) -> None:
        self._bytes = id_to_byte
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if not 0 <= token_id < 256:
            return ""  # not a byte token (a larger vocabulary's other ids): no text
        return self._utf8.decode(bytes((self._bytes[token_id],)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class ByteTokenizer:
    """One token per UTF-8 byte; ids 0..255 (``order="gpt2"``: GPT-2's byte tokens)."""

    def __init__(self, order: Literal["identity", "gpt2"] = "identity") -> None:
        self.order = order
        self._id_to_byte = list(range(256)) if order == "identity" else gpt2_byte_order()
        byte_to_id = [0] * 256
        for token_id, byte in enumerate(self._id_to_byte):
            byte_to_id[byte] = token_id
        self._table = bytes(byte_to_id)

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def eos_id(self) -> int | None:
        return None

    @property
    def bos_id(self) -> int:
        return self._table[ord("\n")]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8").translate(self._table))

    def decoder(self) -> IncrementalDecoder:
        return _ByteDecoder(self._id_to_byte)

    def token_bytes(self, token_id: int) -> bytes:
        return bytes((self._id_to_byte[token_id],)) if 0 <= token_id < 256 else b""


class _JsonDecoder:
    """Incremental detokenization over a sliding window of ids (as vLLM does it): decode
    the ids since the last emitted boundary, emit what is new once it does not end in
    an incomplete character."""

    __slots__ = ("_ids", "_prefix", "_read", "_tokenizer")

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window
        self._read = 0  # ids up to here have been emitted

    def feed(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        before: str = decode(self._ids[self._prefix : self._read], skip_special_tokens=False)
        after: str = decode(self._ids[self._prefix :], skip_special_tokens=False)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        if len(self._ids) > 64:  # keep the window short: decoding it is O(window)
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return after[len(before) :]


class JsonTokenizer:
    """A Hugging Face ``tokenizer.json`` (e.g. GPT-2's byte-level BPE), through the
    ``tokenizers`` package. ``<|endoftext|>``, where the vocabulary has it, is the end
    of text and the start of an empty prompt, as in GPT-2."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as exc:
            raise EngineError(
                "a tokenizer.json needs the 'tokenizers' package: pip install tokenizers"
            ) from exc
        try:
            self._tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise EngineError(f"cannot load tokenizer {path}: {exc}") from exc
        self._vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        eos = self._tokenizer.token_to_id("<|endoftext|>")
        self._eos: int | None = eos if isinstance(eos, int) else None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def bos_id(self) -> int:
        return self._eos if self._eos is not None else 0

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def decoder(self) -> IncrementalDecoder:
        return _JsonDecoder(self._tokenizer)

    def token_bytes(self, token_id: int) -> bytes:
        # A byte-level BPE token is spelt in GPT-2's byte alphabet: map it back, so a
        # token holding part of a character gives its real bytes.
        token = self._tokenizer.id_to_token(token_id)
        if isinstance(token, str) and token and all(ch in _GPT2_BYTE for ch in token):
            return bytes(_GPT2_BYTE[ch] for ch in token)
        text: str = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text.encode("utf-8")
