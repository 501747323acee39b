"""OpenAI's response shapes for what an engine generated here: log-probabilities
(chat's and the legacy completions'), and the choices of stream chunks."""

from __future__ import annotations

from typing import Any

from ..engines.base import Candidate, Token
from .generation import Chunk

__all__ = ["ChatChunks", "TextChunks", "chat_logprobs", "text_logprobs"]


def _candidate(candidate: Candidate) -> dict[str, Any]:
    return {
        "token": candidate.token,
        "logprob": candidate.logprob,
        "bytes": list(candidate.bytes),
    }


def chat_logprobs(tokens: list[Token], top: int) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat answer: one entry per token, with its ``top``
    likeliest alternatives."""
    content = []
    for token in tokens:
        if token.sampled is None:
            continue
        entry = _candidate(token.sampled)
        entry["top_logprobs"] = [_candidate(c) for c in token.top[:top]]
        content.append(entry)
    return {"content": content, "refusal": None}


def text_logprobs(tokens: list[Token], top: int, offset: int) -> dict[str, Any]:
    """``choices[].logprobs`` of a text completion (the legacy shape): the tokens, their
    log-probabilities, the ``top`` likeliest alternatives of each (and the sampled
    token, as vLLM does), and where each token starts in the choice's text."""
    answer: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for token in tokens:
        sampled = token.sampled
        if sampled is None:
            continue
        alternatives = {c.token: c.logprob for c in token.top[:top]}
        alternatives.setdefault(sampled.token, sampled.logprob)
        answer["tokens"].append(sampled.token)
        answer["token_logprobs"].append(sampled.logprob)
        answer["top_logprobs"].append(alternatives)
        answer["text_offset"].append(offset)
        offset += len(token.text)
    return answer


class ChatChunks:
    """``chat.completion.chunk`` events."""

    object = "chat.completion.chunk"

    def __init__(self, top: int | None) -> None:
        self.top = top

    def start(self, index: int) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def text(self, index: int, chunk: Chunk) -> dict[str, Any]:
        logprobs = chat_logprobs(chunk.tokens, self.top) if self.top is not None else None
        delta = {"content": chunk.text}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}

    def finish(self, index: int, reason: str | None) -> dict[str, Any]:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}


class TextChunks:
    """``text_completion`` events; an echoed prompt comes first in each choice."""

    object = "text_completion"

    def __init__(self, top: int | None, echoes: list[str]) -> None:
        self.top = top
        self.echoes = echoes
        self.offsets = [len(e) for e in echoes]

    def start(self, index: int) -> dict[str, Any]:
        return self._choice(index, self.echoes[index], None, None)

    def text(self, index: int, chunk: Chunk) -> dict[str, Any]:
        logprobs = None
        if self.top is not None:
            logprobs = text_logprobs(chunk.tokens, self.top, self.offsets[index])
        self.offsets[index] += len(chunk.text)
        return self._choice(index, chunk.text, logprobs, None)

    def finish(self, index: int, reason: str | None) -> dict[str, Any]:
        return self._choice(index, "", None, reason)

    @staticmethod
    def _choice(
        index: int, text: str, logprobs: dict[str, Any] | None, reason: str | None
    ) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
