"""The engines as a part of the worker: the engine registry, the one HTTP client for
upstream calls, and the AI workload's counts (requests, streams, tokens)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import copy_context
from functools import partial
from typing import Any

import httpx

from ..executor import Pool
from ..observability.metrics import Count, Counts, Metrics
from ..part import Readiness
from ..singletons import Resource, ResourceRegistry, ResourceState
from .base import EngineContext
from .registry import EngineRegistry, discover_factories

__all__ = ["ENGINES", "HTTP_CLIENT", "AICounts", "EngineHost"]

ENGINES = "engines"
HTTP_CLIENT = "http_client"


class AICounts:
    """This worker's AI workload counts; tokens also move their metric."""

    __slots__ = (
        "finish_reasons",
        "first_tokens",
        "requests",
        "streams",
        "time_to_first_token",
        "tokens",
    )

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.requests = Count()
        self.streams = Count()
        self.tokens = Count(metrics.ai_tokens if metrics is not None else None)
        self.first_tokens = Count()
        self.time_to_first_token = Count()  # seconds, summed
        self.finish_reasons = Counts()

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "requests": self.requests.value,
            "streams": self.streams.value,
            "tokens": self.tokens.value,
            "first_tokens": self.first_tokens.value,
            "time_to_first_token_total": self.time_to_first_token.value,
            "finish_reasons": self.finish_reasons.as_dict(),
        }


async def _open_client() -> httpx.AsyncClient:
    # One pooled client per process for every upstream call; no total timeout, as
    # streams may be long, but connecting and each read are bounded.
    timeout = httpx.Timeout(connect=10.0, read=300.0, write=30.0, pool=30.0)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


async def _close_client(client: httpx.AsyncClient) -> None:
    await client.aclose()


async def _close_engines(engines: EngineRegistry) -> None:
    await engines.aclose()


class EngineHost:
    """Declares the engine registry and the HTTP client as this worker's resources."""

    name = "ai"

    def __init__(self, registry: ResourceRegistry, pool: Pool, native_threads: int = 1) -> None:
        self._registry = registry
        self._pool = pool
        self._native_threads = native_threads
        self._engines: EngineRegistry | None = None
        self.counts = AICounts()
        registry.declare(Resource(HTTP_CLIENT, _open_client, close=_close_client))
        registry.declare(Resource(ENGINES, self._open_engines, close=_close_engines))

    async def engines(self) -> EngineRegistry:
        """This worker's engine registry (built on first use)."""
        engines: EngineRegistry = await self._registry.get(ENGINES)
        return engines

    async def start(self, metrics: Metrics) -> None:
        """Count tokens into ``metrics``."""
        self.counts = AICounts(metrics)

    async def stop(self) -> None:
        """The registry closes the engines and the client (they are its resources)."""

    async def readiness(self) -> Readiness:
        """Engines are built on first use; a broken one fails its requests, not the worker."""
        return Readiness()

    def identity(self) -> dict[str, Any]:
        """The counts, and the engine instances this worker built."""
        built = (
            self._engines is not None and self._registry.state_of(ENGINES) is ResourceState.READY
        )
        engines = self._engines.status() if built and self._engines is not None else []
        return {**self.counts.as_dict(), "engines": engines}

    async def _open_engines(self) -> EngineRegistry:
        context = EngineContext(
            run_sync=self._run_sync,
            http_client=self._http_client,
            native_threads=self._native_threads,
        )
        self._engines = EngineRegistry(discover_factories(), context)
        return self._engines

    async def _run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        # An engine's steps belong to a request already admitted (the API checks the
        # pool's capacity before it starts): never refuse them half-way.
        future = self._pool.executor.submit_admitted(copy_context().run, partial(fn, *args))
        return await asyncio.wrap_future(future)

    async def _http_client(self) -> httpx.AsyncClient:
        client: httpx.AsyncClient = await self._registry.get(HTTP_CLIENT)
        return client
