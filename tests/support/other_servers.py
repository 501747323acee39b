"""Start the service under Granian or Uvicorn with real worker processes on a free
loopback port (Hypercorn's helpers are in :mod:`tests.support.server`)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import psutil

from .server import ROOT, Server, free_port, server_env

__all__ = ["OTHER_SERVERS", "Kind", "OtherServer", "running_other_server", "server_command"]

Kind = Literal["granian", "uvicorn"]
OTHER_SERVERS: tuple[Kind, ...] = ("granian", "uvicorn")

# The line each server's worker logs once it listens (Granian's from Rust, after the
# ASGI lifespan startup; Uvicorn's after the lifespan, just before it listens).
_LISTENING = {"granian": "Started worker-", "uvicorn": "Application startup complete."}


def server_command(
    kind: Kind,
    app: str,
    *,
    port: int,
    workers: int,
    extra: Sequence[str] = (),
    via_serve: bool = False,
) -> list[str]:
    """The command line docs/servers.md gives for ``kind``, on 127.0.0.1:``port``;
    ``via_serve``: ``quart-service serve --server KIND`` (the shipped hypercorn.toml)."""
    if via_serve:
        return [
            sys.executable, "-m", "quart_service.server.cli", "serve", "--server", kind,
            "--bind", f"127.0.0.1:{port}", "--workers", str(workers), *extra, app,
        ]  # fmt: skip
    bind = ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if kind == "granian":
        program = ["-m", "granian", "--interface", "asgi", "--loop", "uvloop"]
    else:
        program = ["-m", "uvicorn", "--loop", "uvloop", "--http", "httptools"]
    return [sys.executable, *program, *bind, *extra, app]


@dataclass
class OtherServer(Server):
    """A running Granian or Uvicorn, its workers, and where its output goes."""

    kind: Kind

    def worker_pids(self) -> list[int]:
        """The worker processes: Granian forks them, Uvicorn spawns them; neither
        counts multiprocessing's resource tracker."""
        pids = []
        for child in psutil.Process(self.process.pid).children():
            with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(
                    child.cmdline()
                ):
                    pids.append(child.pid)
        return sorted(pids)


@contextlib.contextmanager
def running_other_server(
    kind: Kind,
    tmp_path: Path,
    *,
    app: str = "quart_service.app:app",
    workers: int = 2,
    env: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
    via_serve: bool = False,
    start_timeout: float = 30.0,
) -> Iterator[OtherServer]:
    """Run ``kind`` with ``workers`` processes (``extra``: more of its own options;
    ``via_serve``: started by ``quart-service serve --server KIND``) until every worker
    listens; stop it by PID afterwards."""
    port = free_port()
    log_path = tmp_path / f"{kind}-{port}.log"
    env = {"QUART_SERVICE_DATA_DIR": str(tmp_path / f"data-{port}"), **(env or {})}
    command = server_command(
        kind, app, port=port, workers=workers, extra=extra, via_serve=via_serve
    )
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, env=server_env(env), stdout=log_file, stderr=subprocess.STDOUT
        )
    server = OtherServer(process, port, log_path, kind)
    try:
        _wait_until_listening(server, workers, start_timeout)
        yield server
    finally:
        server.stop()


def _wait_until_listening(server: OtherServer, workers: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            code = server.process.returncode
            raise RuntimeError(f"{server.kind} exited with {code}:\n{server.log()}")
        if server.log().count(_LISTENING[server.kind]) >= workers:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(server.url + "/livez", timeout=2)
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.kind} did not start within {timeout} s:\n{server.log()}")
