"""One generation: an engine's tokens with stop sequences, usage and finish reason.

Streaming and non-streaming answers both come from :class:`Generation`, which is why
a streamed text equals the non-streamed text for the same seed. Text is released a
whole token at a time (a token that could still begin a stop sequence is held back),
so each chunk's log-probabilities belong to exactly the text it carries.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..engines.base import Engine, GenerationRequest, Token, TokenEngine
from ..engines.host import AICounts

__all__ = ["SLICE", "Chunk", "Generation", "closing", "count_tokens", "merge"]

T = TypeVar("T")
# Work proportional to a prompt runs in slices of this many characters, on the pool:
# one C call (a regex, an encoder) holds the GIL for its whole input, so a slice is
# what bounds how long the event loop may wait for it.
SLICE = 16 * 1024
_SPACE = re.compile(r"\s")


@asynccontextmanager
async def closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close ``iterator`` (if it can be closed: an engine's may be any async iterator)
    when the block ends: a client gone then releases what the iterator holds at
    once, not when it is collected."""
    try:
        yield iterator
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


@dataclass(slots=True)
class Chunk:
    """Text to send and the tokens it is made of (their log-probabilities, when asked)."""

    text: str
    tokens: list[Token] = field(default_factory=list)


def _count_slices(count: Callable[[str], int], text: str) -> int:
    total, start = 0, 0
    while start < len(text):
        end = min(start + SLICE, len(text))
        if end < len(text):
            # Cut at a space, where no engine's token spans (the n-gram engine's never
            # do; a BPE's rarely), so the sum is the count of the whole.
            space = _SPACE.search(text, end, min(end + 4096, len(text)))
            end = space.start() if space else end
        total += count(text[start:end])
        start = end
        # Hand the GIL over now: the event loop waiting for it runs at once, instead
        # of after the switch interval (5 ms) of each slice.
        time.sleep(0)
    return total


async def count_tokens(
    count: Callable[[str], int], text: str, run_sync: Callable[..., Awaitable[Any]]
) -> int:
    """``count(text)``; a text over :data:`SLICE` characters is counted in slices on the
    pool (``run_sync(fn, *args)``), so the event loop never waits for more than one
    slice (the pool's thread gives the GIL up between them)."""
    if len(text) <= SLICE:
        return count(text)
    total: int = await run_sync(_count_slices, count, text)
    return total


class Generation:
    """Runs ``engine`` for ``request``; iterate :meth:`chunks` (or :meth:`pieces`) once.
    ``prompt_tokens`` is the usage's prompt count (computed by the caller, off the
    event loop for a large prompt)."""

    def __init__(
        self,
        engine: Engine,
        request: GenerationRequest,
        counts: AICounts,
        prompt_tokens: int,
    ) -> None:
        self.engine = engine
        self.request = request
        self.counts = counts
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.prompt_tokens = prompt_tokens
        self._started = time.monotonic()

    def usage(self) -> dict[str, int]:
        """OpenAI's usage object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    async def pieces(self) -> AsyncIterator[str]:
        """The text of :meth:`chunks`."""
        async for chunk in self.chunks():
            yield chunk.text

    def _tokens(self) -> AsyncIterator[Token]:
        engine = self.engine
        if isinstance(engine, TokenEngine):
            return engine.generate_tokens(self.request)
        return _as_tokens(engine.generate(self.request))

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Text to send, stop sequences applied; sets ``finish_reason`` at the end."""
        stops = self.request.stop
        pending: list[Token] = []
        text = ""  # the pending tokens' text
        counts = self.counts
        # The neural engine's stream leaves its batch as soon as its client has gone.
        async with closing(self._tokens()) as tokens:
            async for token in tokens:
                if self.completion_tokens == 0:
                    counts.first_tokens.inc()
                    counts.time_to_first_token.inc(time.monotonic() - self._started)
                self.completion_tokens += 1
                counts.tokens.inc()
                if not stops:
                    yield Chunk(token.text, [token])
                    continue
                pending.append(token)
                text += token.text
                cut = _find_stop(text, stops)
                if cut is not None:
                    kept, _ = _split(pending, cut)
                    if text[:cut]:
                        yield Chunk(text[:cut], kept)
                    self._finish("stop")
                    return
                # Keep back the tokens of a tail that could still become a stop sequence.
                safe = len(text) - _prefix_overlap(text, stops)
                ready, size = _split(pending, safe)
                if ready:
                    yield Chunk(text[:size], ready)
                    pending = pending[len(ready) :]
                    text = text[size:]
        if pending:
            yield Chunk(text, pending)
        self._finish("length" if self.completion_tokens >= self.request.max_tokens else "stop")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.counts.finish_reasons.inc(reason)


async def _as_tokens(pieces: AsyncIterator[str]) -> AsyncIterator[Token]:
    async with closing(pieces):
        async for piece in pieces:
            yield Token(piece)


def _split(tokens: Sequence[Token], limit: int) -> tuple[list[Token], int]:
    """The leading tokens whose text lies wholly within the first ``limit`` characters,
    and the length of their text."""
    size = 0
    for i, token in enumerate(tokens):
        if size + len(token.text) > limit:
            return list(tokens[:i]), size
        size += len(token.text)
    return list(tokens), size


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _prefix_overlap(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some stop sequence."""
    limit = max(len(s) for s in stops) - 1
    for size in range(min(limit, len(text)), 0, -1):
        tail = text[-size:]
        if any(stop.startswith(tail) for stop in stops):
            return size
    return 0


class _End:
    """A source ended (``error``: how, when it failed)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception | None) -> None:
        self.error = error


async def merge(
    sources: Sequence[AsyncGenerator[T, None]],
) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, each with its source's index.
    Closing this generator (a client gone) cancels the readers and closes the sources;
    an error in one source ends the merge with that error."""
    if len(sources) == 1:
        async with aclosing(sources[0]) as only:
            async for item in only:
                yield 0, item
        return
    # Bounded: a source runs at most a few items ahead of the client.
    queue: asyncio.Queue[tuple[int, T] | _End] = asyncio.Queue(maxsize=len(sources) * 4)

    async def read(index: int, source: AsyncGenerator[T, None]) -> None:
        try:
            async for item in source:
                await queue.put((index, item))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(_End(exc))
        else:
            await queue.put(_End(None))

    readers = [asyncio.create_task(read(i, s)) for i, s in enumerate(sources)]
    running = len(readers)
    try:
        while running:
            entry = await queue.get()
            if isinstance(entry, _End):
                if entry.error is not None:
                    raise entry.error
                running -= 1
                continue
            yield entry
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for source in sources:
            await source.aclose()
