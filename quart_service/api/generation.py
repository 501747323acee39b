"""One generation: an engine's pieces with stop sequences, usage and finish reason.

Streaming and non-streaming answers both come from :class:`Generation`, which is why
a streamed text equals the non-streamed text for the same seed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..engines.base import Engine, GenerationRequest
from ..engines.host import AICounts

__all__ = ["Generation"]


class Generation:
    """Runs ``engine`` for ``request``; iterate :meth:`pieces` once."""

    def __init__(self, engine: Engine, request: GenerationRequest, counts: AICounts) -> None:
        self.engine = engine
        self.request = request
        self.counts = counts
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.prompt_tokens = engine.count_tokens(request.prompt)
        self._started = time.monotonic()

    def usage(self) -> dict[str, int]:
        """OpenAI's usage object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    async def pieces(self) -> AsyncIterator[str]:
        """Text to send, stop sequences applied; sets ``finish_reason`` at the end."""
        stops = self.request.stop
        holdback = max((len(s) for s in stops), default=1) - 1
        pending = ""
        counts = self.counts
        async for piece in self.engine.generate(self.request):
            if self.completion_tokens == 0:
                counts.first_tokens.inc()
                counts.time_to_first_token.inc(time.monotonic() - self._started)
            self.completion_tokens += 1
            counts.tokens.inc()
            pending += piece
            if stops:
                cut = _find_stop(pending, stops)
                if cut is not None:
                    if pending[:cut]:
                        yield pending[:cut]
                    self._finish("stop")
                    return
                # Keep back a tail that could still become a stop sequence.
                safe = len(pending) - _prefix_overlap(pending, stops, holdback)
                if safe > 0:
                    yield pending[:safe]
                    pending = pending[safe:]
            else:
                yield pending
                pending = ""
        if pending:
            yield pending
        self._finish("length" if self.completion_tokens >= self.request.max_tokens else "stop")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.counts.finish_reasons.inc(reason)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _prefix_overlap(text: str, stops: tuple[str, ...], limit: int) -> int:
    """Length of the longest end of ``text`` that begins some stop sequence."""
    for size in range(min(limit, len(text)), 0, -1):
        tail = text[-size:]
        if any(stop.startswith(tail) for stop in stops):
            return size
    return 0
