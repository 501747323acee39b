"""The resource registry in process: once, retry after failure, limits, close order."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestAppProtocol as RunningApp

from quart_service import (
    Overloaded,
    Resource,
    ResourceRegistry,
    ResourceState,
    ResourceUnavailable,
    Settings,
    create_app,
)


async def test_concurrent_first_uses_create_once() -> None:
    calls = 0

    async def factory() -> object:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return object()

    registry = ResourceRegistry([Resource("thing", factory)])
    values: list[object] = await asyncio.gather(*(registry.get("thing") for _ in range(100)))
    assert calls == 1
    assert all(value is values[0] for value in values)
    (status,) = registry.status()
    assert status.state is ResourceState.READY
    assert status.instance_id


async def test_a_failed_creation_is_retried_on_next_use() -> None:
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("upstream down")
        return "client"

    registry = ResourceRegistry([Resource("client", flaky)])
    with pytest.raises(ResourceUnavailable, match="upstream down"):
        await registry.get("client")
    (status,) = registry.status()
    assert status.state is ResourceState.FAILED
    assert status.error == "ConnectionError: upstream down"
    assert await registry.get("client") == "client"
    assert registry.status()[0].state is ResourceState.READY


async def test_close_runs_in_reverse_creation_order() -> None:
    closed: list[str] = []

    def spec(name: str) -> Resource[str]:
        async def factory() -> str:
            return name

        async def close(value: str) -> None:
            closed.append(value)

        return Resource(name, factory, close=close)

    registry = ResourceRegistry([spec("a"), spec("b"), spec("c"), spec("unused")])
    for name in ("b", "a", "c"):
        await registry.get(name)
    await registry.aclose()
    assert closed == ["c", "a", "b"]
    assert {s.state for s in registry.status()} == {ResourceState.CLOSED}
    with pytest.raises(ResourceUnavailable, match="closed"):
        await registry.get("a")


async def test_limit_caps_concurrent_use_and_sheds_excess_waiters() -> None:
    async def factory() -> object:
        return object()

    model = Resource("model", factory, limit=2)
    registry = ResourceRegistry([model], max_waiting=3)
    running = peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    results = await asyncio.gather(
        *(registry.run_sync(model, work) for _ in range(10)), return_exceptions=True
    )
    shed = [r for r in results if isinstance(r, Overloaded)]
    assert peak == 2
    # 2 run, 3 wait, the other 5 are refused at once.
    assert len(shed) == 5
    assert all(r is None for r in results if not isinstance(r, Overloaded))


def test_declaration_mistakes_are_explained() -> None:
    async def factory() -> int:
        return 1

    registry = ResourceRegistry([Resource("x", factory)])
    with pytest.raises(ValueError, match="declared twice"):
        registry.declare(Resource("x", factory))
    with pytest.raises(ValueError, match="limit must be >= 1"):
        registry.declare(Resource("y", factory, limit=0))
    with pytest.raises(LookupError, match="no resource named 'z'"):
        asyncio.run(registry.get("z"))


class Switch:
    """Decides whether the required resource's factory works."""

    broken = True


def _required_app(settings: Settings) -> Quart:
    async def factory() -> str:
        if Switch.broken:
            raise OSError("disk missing")
        return "ok"

    return create_app(settings, resources=[Resource("store", factory, required=True)])


@pytest.fixture
def app(settings: Settings) -> Quart:
    Switch.broken = True
    return _required_app(settings)


async def test_readyz_reflects_required_resources(test_app: RunningApp) -> None:
    client = test_app.test_client()
    response = await client.get("/readyz")
    body: dict[str, Any] = await response.get_json()
    assert response.status_code == 503
    assert body["status"] == "not_ready"
    assert "resource 'store' is failed: OSError: disk missing" in body["problems"]
    Switch.broken = False
    # /readyz retried the failed resource in the background; it recovers by itself.
    for _ in range(50):
        response = await client.get("/readyz")
        if response.status_code == 200:
            break
        await asyncio.sleep(0.01)
    assert response.status_code == 200
    checks = (await response.get_json())["checks"]
    assert checks["resources"]["store"] == "ready"
    assert checks["resources"]["snapshot"] == "ready"
    assert (await client.get("/livez")).status_code == 200


async def test_identity_endpoint_is_off_by_default() -> None:
    app = create_app(Settings())
    async with app.test_app() as running:
        response = await running.test_client().get("/debug/identity")
        assert response.status_code == 404
        assert (await response.get_json())["error"]["code"] == "not_found"
