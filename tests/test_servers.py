"""Running under servers whose workers handle SIGTERM themselves (Granian, Uvicorn),
in process: the drain takes SIGTERM first and hands it on; ``serve --server`` maps the
Hypercorn file to the other server's command line (docs/servers.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import click
import pytest
from hypercorn.config import Config

from quart_service import Settings, create_app
from quart_service.server.cli import other_server_argv

from .support.server import SHIPPED_CONFIG


async def _wait_until(check: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the timeout"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("owner", ["uvicorn-like", "event-loop"])
async def test_sigterm_starts_the_drain_and_reaches_the_servers_own_handler(
    tmp_path: Path, owner: str
) -> None:
    """Uvicorn installs a plain handler: it runs once the first drain second passed.
    Granian registers on the event loop: its handler runs at once. Either way the
    drain starts, and the server gets its handler back when the worker stops."""
    calls: list[float] = []

    def server_handler(signum: int = 0, frame: FrameType | None = None) -> None:
        calls.append(time.monotonic())

    loop = asyncio.get_running_loop()
    outer = signal.getsignal(signal.SIGTERM)
    if owner == "uvicorn-like":
        signal.signal(signal.SIGTERM, server_handler)
    else:
        loop.add_signal_handler(signal.SIGTERM, server_handler)
    installed = signal.getsignal(signal.SIGTERM)
    settings = Settings(data_dir=str(tmp_path / "data"), stream_drain_timeout=1.5)
    try:
        app = create_app(settings)
        async with app.test_app() as running:
            client = running.test_client()
            before = await (await client.get("/readyz")).get_json()
            assert not [p for p in before["problems"] if "draining" in p]
            os.kill(os.getpid(), signal.SIGTERM)
            sent = time.monotonic()
            await _wait_until(lambda: calls)
            response = await client.get("/readyz")
            assert response.status_code == 503
            body = await response.get_json()
            assert [p for p in body["problems"] if "draining" in p], body
            if owner == "uvicorn-like":
                # The soft second: keep-alive clients see Connection: close first.
                assert calls[0] - sent >= 0.9
        # Stopped: SIGTERM belongs to the server again; the drain called it once.
        assert signal.getsignal(signal.SIGTERM) == installed
        assert len(calls) == 1
    finally:
        if owner == "event-loop":
            loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, outer)


def _shipped(**changes: object) -> Config:
    config = Config.from_toml(SHIPPED_CONFIG)
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def test_serve_maps_the_hypercorn_file_to_granian_and_uvicorn() -> None:
    config = _shipped(bind=["0.0.0.0:9000"], workers=3)
    granian = other_server_argv("granian", "pkg.mod:app", config, drain_timeout=25)
    assert granian[:3] == [sys.executable, "-m", "granian"]
    assert " ".join(granian[3:]) == (
        "--interface asgi --loop uvloop --host 0.0.0.0 --port 9000 --workers 3 "
        "--backlog 2048 --respawn-failed-workers --workers-kill-timeout 30 pkg.mod:app"
    )
    uvicorn = other_server_argv("uvicorn", "pkg.mod:app", config, drain_timeout=2.5)
    assert uvicorn[:3] == [sys.executable, "-m", "uvicorn"]
    assert " ".join(uvicorn[3:]) == (
        "--loop uvloop --http httptools --host 0.0.0.0 --port 9000 --workers 3 "
        "--backlog 2048 --lifespan on --timeout-graceful-shutdown 8 "
        "--timeout-keep-alive 75 --no-access-log pkg.mod:app"
    )
    ipv6 = other_server_argv("uvicorn", "a:b", _shipped(bind=["[::1]:8000"]), 25)
    assert ipv6[ipv6.index("--host") + 1] == "::1"


@pytest.mark.parametrize(
    "bind", [["127.0.0.1:8000", "127.0.0.1:8001"], ["unix:/run/q.sock"], ["fd://3"], ["8000"]]
)
def test_serve_refuses_what_the_other_servers_cannot_take(bind: list[str]) -> None:
    with pytest.raises(click.UsageError, match="--server granian takes"):
        other_server_argv("granian", "a:b", _shipped(bind=bind), 25)
