"""What an engine is: something that turns a prompt into a stream of text pieces.

Engines are per-process singletons, one instance per model row, built by a factory
registered under the entry-point group ``quart_service.engines``::

    [project.entry-points."quart_service.engines"]
    my-engine = "my_package.engine:create"

    async def create(model: ModelConfig, context: EngineContext) -> Engine: ...

The API layer handles the protocol (OpenAI shapes, stop sequences, usage, finish
reasons); an engine only generates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import httpx

from ..data.models import ModelConfig

__all__ = [
    "Embedder",
    "Engine",
    "EngineContext",
    "EngineFactory",
    "GenerationRequest",
    "Message",
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
