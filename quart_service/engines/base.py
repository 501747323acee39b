"""What an engine is: something that turns a prompt into a stream of text pieces.

Engines are per-process singletons, one instance per model row, built by a factory
registered under the entry-point group ``quart_service.engines``::

    [project.entry-points."quart_service.engines"]
    my-engine = "my_package.engine:create"

    async def create(model: ModelConfig, context: EngineContext) -> Engine: ...

The API layer handles the protocol (OpenAI shapes, stop sequences, usage, finish
reasons, ``n``); an engine only generates. Optional abilities, each a protocol the API
checks for (a request needing one an engine lacks is refused with 400 naming the
field, never silently ignored):

* :class:`TokenEngine` — tokens with their log-probabilities (``logprobs``);
* :class:`Embedder` — ``/v1/embeddings``;
* :class:`Proxy` — the engine speaks OpenAI's protocol itself (``upstream``): the API
  relays the request body and the answer, status and error bodies included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import httpx

from ..data.models import ModelConfig

__all__ = [
    "Candidate",
    "Embedder",
    "Engine",
    "EngineContext",
    "EngineFactory",
    "GenerationRequest",
    "Message",
    "Proxy",
    "ProxyReply",
    "Token",
    "TokenEngine",
]


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate. ``messages`` is set for chat, ``prompt`` always."""

    prompt: str
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    messages: tuple[Message, ...] = ()
    # None: no log-probabilities wanted; k: each token's, and its k likeliest
    # alternatives (only a TokenEngine is asked for them).
    logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A token with its log-probability under the model's own distribution (before
    temperature and top_p). ``bytes`` are the token's UTF-8 bytes, which may be part of
    a character (then ``token`` shows U+FFFD where the part is)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]

    @classmethod
    def of_text(cls, token: str, logprob: float) -> Candidate:
        """A candidate whose bytes are its text's."""
        return cls(token, logprob, tuple(token.encode("utf-8")))


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token: the text it adds to the output ('' while a character is
    incomplete), and, when ``logprobs`` was asked, the token itself with its
    log-probability and the likeliest alternatives (most likely first)."""

    text: str
    sampled: Candidate | None = None
    top: tuple[Candidate, ...] = ()


class Engine(Protocol):
    """A model's generator, one instance per model per process."""

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` is, in this engine's units (for usage counts)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        """Text pieces, one token each, at most ``request.max_tokens`` of them."""
        ...

    async def aclose(self) -> None:
        """Release what the instance holds (called when its model row changes)."""
        ...


@runtime_checkable
class TokenEngine(Protocol):
    """An engine that reports what it sampled: log-probabilities and alternatives."""

    def generate_tokens(self, request: GenerationRequest) -> AsyncIterator[Token]:
        """Tokens, at most ``request.max_tokens``; each with ``sampled`` and up to
        ``request.logprobs`` alternatives when ``request.logprobs`` is not None."""
        ...


@dataclass(frozen=True, slots=True)
class ProxyReply:
    """An upstream server's answer as it is relayed: its status, the headers worth
    passing on (``Retry-After``, rate-limit headers), and either its whole body or,
    for a stream that the upstream accepted, its SSE lines."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    lines: AsyncIterator[str] | None = None


@runtime_checkable
class Proxy(Protocol):
    """An engine that relays OpenAI requests to another server: every field it does not
    interpret itself goes through unchanged, and the upstream's status and error
    bodies come back unchanged."""

    async def relay(self, endpoint: str, body: dict[str, Any]) -> ProxyReply:
        """Send ``body`` to the upstream's ``endpoint`` (``chat/completions``,
        ``completions``, ``embeddings``). For ``stream: true`` with a 200, ``lines``
        yields the upstream's SSE lines; iterating it to the end or closing it
        releases the connection. Raises :class:`~quart_service.errors.EngineError`
        when the upstream cannot be reached."""
        ...


@runtime_checkable
class Embedder(Protocol):
    """An engine that also embeds text (``POST /v1/embeddings``)."""

    dimensions: int  # the length of every vector it returns

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit-length vector per text, in order."""
        ...


@dataclass(frozen=True, slots=True)
class EngineContext:
    """What the service lends an engine: the shared pool, the HTTP client, and the
    worker's native thread budget.

    ``native_threads`` is how many threads a native runtime may use in this worker
    (the ``native_threads`` setting; by default the CPUs this process may use divided
    by the workers). OpenBLAS and OpenMP are capped already (``OMP_NUM_THREADS`` and
    the others are set before libraries load); size what no variable reaches by it:
    onnxruntime's ``SessionOptions.intra_op_num_threads`` (and ``inter_op_num_threads
    = 1``), ``torch.set_num_threads``. The service always passes it; the default
    (one thread) is for engines built in tests.
    """

    run_sync: Callable[..., Awaitable[Any]]  # run_sync(fn, *args) on the shared pool
    http_client: Callable[[], Awaitable[httpx.AsyncClient]]  # this process's client
    native_threads: int = 1


EngineFactory = Callable[[ModelConfig, EngineContext], Awaitable[Engine]]
