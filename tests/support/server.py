"""Start the real Hypercorn with real worker processes on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 15.0) -> T:
    """Call ``check()`` every 0.05 s until it returns something truthy, and return that;
    fail naming ``what`` (and the last result) once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last check: {result!r})")
        time.sleep(0.05)


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A running Hypercorn, its workers, and where its output goes."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """The spawned worker processes (not multiprocessing's resource tracker)."""
        parent = psutil.Process(self.process.pid)
        pids = []
        for child in parent.children():
            # A worker that exited but is not reaped yet is no worker any more.
            with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(
                    child.cmdline()
                ):
                    pids.append(child.pid)
        return sorted(pids)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM by PID, then SIGKILL if it does not exit within ``timeout`` seconds;
        returns the exit code."""
        self.terminate()
        return self.wait_or_kill(timeout)

    def terminate(self) -> None:
        """Send SIGTERM to the server's parent process (by PID), if it still runs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_or_kill(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the server to exit; then SIGKILL its
        workers and its parent (by PID). Returns the exit code."""
        return wait_or_kill(self.process, self.worker_pids, timeout)


def wait_or_kill(
    process: subprocess.Popen[bytes], workers: Callable[[], Iterable[int]], timeout: float
) -> int:
    """Wait up to ``timeout`` seconds for a server's main ``process`` to exit; then
    SIGKILL its ``workers()`` and it (by PID). Its exit code."""
    try:
        process.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        for pid in workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait(timeout=5)
    return process.returncode


def server_env(extra: Mapping[str, str] | None = None, root: Path = ROOT) -> dict[str, str]:
    """The environment for a server: ours without QUART_SERVICE_*, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUART_SERVICE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


SHIPPED_CONFIG = ROOT / "hypercorn.toml"


def spawn_hypercorn(
    app: str,
    *,
    port: int,
    workers: int,
    env: Mapping[str, str] | None,
    log_path: Path,
    config: Path | None = SHIPPED_CONFIG,
    command: str = "hypercorn",
    root: Path = ROOT,
) -> subprocess.Popen[bytes]:
    """``hypercorn --config hypercorn.toml`` (the shipped file; None: Hypercorn's own
    defaults) with bind and workers set; ``command="serve"``: ``quart-service serve``
    with the same arguments. ``root``: the checkout whose code runs (a bench compares
    another one)."""
    config_args = ["--config", str(config)] if config is not None else []
    if command == "serve":
        program = [sys.executable, "-m", "quart_service.server.cli", "serve"]
        if config is None:
            # serve refuses to start without a server file: an empty one gives
            # Hypercorn's defaults.
            empty = log_path.with_suffix(".toml")
            empty.write_text("")
            config_args = ["--config", str(empty)]
    else:
        program = [sys.executable, "-m", "hypercorn"]
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [
                *program,
                *config_args,
                "--bind", f"127.0.0.1:{port}",
                "--workers", str(workers),
                app,
            ],
            cwd=root,
            env=server_env(env, root),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


@contextlib.contextmanager
def running_server(
    tmp_path: Path,
    *,
    app: str = "tests.apps.chassis:app",
    workers: int = 2,
    env: Mapping[str, str] | None = None,
    start_timeout: float = 30.0,
    config: Path | None = SHIPPED_CONFIG,
    command: str = "hypercorn",
    root: Path = ROOT,
) -> Iterator[Server]:
    """Run a real Hypercorn (``command="serve"``: ``quart-service serve``) with
    ``workers`` processes; stop it by PID afterwards."""
    port = free_port()
    log_path = tmp_path / f"hypercorn-{port}.log"
    # Each server gets its own data folder unless the test shares one on purpose.
    env = {"QUART_SERVICE_DATA_DIR": str(tmp_path / f"data-{port}"), **(env or {})}
    process = spawn_hypercorn(
        app,
        port=port,
        workers=workers,
        env=env,
        log_path=log_path,
        config=config,
        command=command,
        root=root,
    )
    server = Server(process, port, log_path)
    try:
        wait_until_serving(server, workers, start_timeout)
        yield server
    finally:
        server.stop()


def wait_until_serving(server: Server, workers: int, timeout: float) -> None:
    """Until every worker logged that it serves and the server answers HTTP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            code = server.process.returncode
            raise RuntimeError(f"hypercorn exited with {code}:\n{server.log()}")
        if server.log().count("Running on") >= workers:
            with contextlib.suppress(httpx.HTTPError):
                # Any answer will do: bench apps have no /livez.
                httpx.get(server.url + "/livez", timeout=2)
                return
        time.sleep(0.1)
    raise RuntimeError(f"hypercorn did not start within {timeout} s:\n{server.log()}")


def pin_workers(server: Server, count: int, attempts: int = 400) -> dict[int, httpx.Client]:
    """One keep-alive client per worker: each new connection lands on some worker;
    keep the first client that reached each one (the connection stays pinned)."""
    pinned: dict[int, httpx.Client] = {}
    for _ in range(attempts):
        # One connection, kept however long the test idles (httpx drops idle ones
        # after 5 s by default; the server keeps them for keep_alive_timeout, 75 s).
        limits = httpx.Limits(max_connections=1, keepalive_expiry=600)
        client = httpx.Client(base_url=server.url, timeout=30, limits=limits)
        pid = client.get("/livez").json()["pid"]
        if pid in pinned:
            client.close()
        else:
            pinned[pid] = client
            if len(pinned) == count:
                return pinned
    for client in pinned.values():
        client.close()
    raise RuntimeError(f"reached {len(pinned)} of {count} workers in {attempts} connections")


def sqlite3_shell(database: Path, sql: str) -> None:
    """Change the database the way an operator would: the sqlite3 command-line shell."""
    subprocess.run(["sqlite3", str(database), sql], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def pinned_workers(server: Server, count: int) -> Iterator[dict[int, httpx.Client]]:
    """:func:`pin_workers`, closing the clients afterwards."""
    clients = pin_workers(server, count)
    try:
        yield clients
    finally:
        for client in clients.values():
            client.close()


@contextlib.contextmanager
def peak_threads(pids: list[int], every: float = 0.01) -> Iterator[dict[int, int]]:
    """Sample /proc/PID/status of ``pids`` in a thread while the block runs; the dict
    holds each process's peak thread count (filled in as it goes)."""
    from quart_service.observability.proc import thread_count

    peak = dict.fromkeys(pids, 0)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in pids:
                peak[pid] = max(peak[pid], thread_count(pid))
            time.sleep(every)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
