"""Development mode: ``quart-service serve --reload`` replaces its workers when a
source file changes, and a broken save leaves the old worker serving."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.support.server import free_port, server_env, wait_for

APP_SOURCE = """
import os

from quart import Quart

app = Quart(__name__)


@app.get("/livez")
async def livez():
    return {{"version": {version}, "pid": os.getpid()}}
"""


def _version(url: str, version: int) -> dict[str, int] | None:
    """The answer, when it comes from code of ``version``."""
    answer = _answer(url)
    return answer if answer is not None and answer["version"] == version else None


def _answer(url: str) -> dict[str, int] | None:
    with contextlib.suppress(httpx.HTTPError):
        response = httpx.get(url + "/livez", timeout=2)
        if response.status_code == 200:
            body: dict[str, int] = response.json()
            return body
    return None


@contextlib.contextmanager
def _serving(folder: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = server_env({"QUART_SERVICE_STREAM_DRAIN_TIMEOUT": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env["PYTHONPATH"]])
    (folder / "hypercorn.toml").write_text("workers = 1\ngraceful_timeout = 2\n")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "quart_service.server.cli", "serve", "--reload",
                "--reload-dir", str(folder), "--bind", f"127.0.0.1:{port}", "devapp:app",
            ],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def test_a_changed_file_replaces_the_worker_and_a_broken_one_keeps_the_old(
    tmp_path: Path,
) -> None:
    source = tmp_path / "devapp.py"
    source.write_text(APP_SOURCE.format(version=1))
    log = tmp_path / "serve.log"
    with _serving(tmp_path, log) as (url, process):
        first = wait_for(lambda: _version(url, 1), "the first worker serving", timeout=30)
        assert first is not None
        assert "development mode" in log.read_text()

        source.write_text(APP_SOURCE.format(version=2))
        second = wait_for(lambda: _version(url, 2), "the reloaded code")
        assert second is not None
        assert second["pid"] != first["pid"]

        # A syntax error: the new worker fails to start, the old one serves on, and
        # the supervisor waits for the next save instead of giving up.
        source.write_text("def broken(:\n")
        wait_for(lambda: "the old ones keep serving" in log.read_text(), "the failed reload")
        still = _answer(url)
        assert still == second
        assert process.poll() is None

        source.write_text(APP_SOURCE.format(version=3))
        wait_for(lambda: _version(url, 3), "the fixed code")
