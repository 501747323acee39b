"""A real ``redis-server`` for tests: a free loopback port, a temporary folder, no
persistence; started and stopped by PID.

``running_redis(tmp)`` is a context manager yielding a :class:`RedisServer`; the
session fixture ``redis_server`` (tests/conftest.py) shares one across the tests, and
``redis_url`` gives its URL with the database flushed first.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .server import free_port, wait_for

__all__ = ["RedisServer", "running_redis"]


def _ping(port: int) -> bool:
    """One raw RESP PING (no client library): True if the server answers PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port`` with its files in ``folder``."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.folder / "redis.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "no",
            "dir": str(self.folder),
            "logfile": str(self.log_path),
            "daemonize": "no",
        }
        argv = ["redis-server"]
        for name, value in options.items():
            argv += [f"--{name}", value]
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"redis-server exited {process.returncode}:\n{self.log()}")
            return _ping(self.port)

        wait_for(up, f"redis-server answering PING on port {self.port}", timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID (SIGKILL if it does not exit in time); wait for the port to close."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        wait_for(lambda: not _ping(self.port), f"port {self.port} closed", timeout)

    def flushall(self) -> None:
        """Empty every database (raw RESP, so this module needs no client library)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
            answer = sock.recv(64)
        if not answer.startswith(b"+OK"):
            raise AssertionError(f"FLUSHALL answered {answer!r}")

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start on the same port (empty: no
        persistence, as after a real crash of a cache-only Redis)."""
        self.stop()
        time.sleep(down_for)
        self.start()


@contextlib.contextmanager
def running_redis(folder: Path, port: int | None = None) -> Iterator[RedisServer]:
    """A ``redis-server`` on a free loopback port; stopped by PID on the way out."""
    server = RedisServer(port or free_port(), folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
