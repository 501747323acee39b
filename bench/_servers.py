"""A bench's own server process: launched with its output in a log file, waited for
until it serves, stopped by PID afterwards."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, TypeVar

from tests.support.server import ROOT, server_env


class Started(Protocol):
    """A started server: its main process, where its output goes, how to stop it."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> object: ...


S = TypeVar("S", bound=Started)


def launch(argv: list[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Run ``argv`` from the checkout's root with :func:`server_env` plus ``env``, its
    output (stdout and stderr) into ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            argv, cwd=ROOT, env=server_env(env), stdout=log, stderr=subprocess.STDOUT
        )


@contextlib.contextmanager
def started(
    server: S, name: str, ready: Callable[[], bool], *, timeout: float, every: float
) -> Iterator[S]:
    """``server`` once ``ready()`` (asked every ``every`` s) says it serves; its log in
    the error if it exits or is not ready within ``timeout`` s. Stopped on leaving."""
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.process.poll() is not None:
                code = server.process.returncode
                raise RuntimeError(f"{name} exited with {code}:\n{_log(server)}")
            if ready():
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start within {timeout:g} s:\n{_log(server)}")
            time.sleep(every)
        yield server
    finally:
        server.stop()


def _log(server: Started) -> str:
    return server.log_path.read_text(errors="replace")
