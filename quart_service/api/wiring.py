"""The AI layer's per-process resources: the engine registry and the HTTP client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import copy_context
from functools import partial
from typing import Any

import httpx

from ..engines.base import EngineContext
from ..engines.registry import EngineRegistry, discover_factories
from ..executor import BoundedExecutor
from ..resources import Resource, ResourceRegistry

__all__ = ["ENGINES", "HTTP_CLIENT", "ai_resources"]

ENGINES = "engines"
HTTP_CLIENT = "http_client"


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


def ai_resources(
    registry: Callable[[], ResourceRegistry], executor: Callable[[], BoundedExecutor]
) -> list[Resource[Any]]:
    """The resources the v1 API uses, declared in every worker's registry."""

    async def run_sync(fn: Callable[..., Any], *args: Any) -> Any:
        # An engine's steps belong to a request already admitted (the API checks the
        # pool's capacity before it starts): never refuse them half-way.
        future = executor().submit_admitted(copy_context().run, partial(fn, *args))
        return await asyncio.wrap_future(future)

    async def http_client() -> httpx.AsyncClient:
        client: httpx.AsyncClient = await registry().get(HTTP_CLIENT)
        return client

    async def open_engines() -> EngineRegistry:
        context = EngineContext(run_sync=run_sync, http_client=http_client)
        return EngineRegistry(discover_factories(), context)

    return [
        Resource(HTTP_CLIENT, _open_client, close=_close_client),
        Resource(ENGINES, open_engines, close=_close_engines),
    ]
