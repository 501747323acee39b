"""A real PostgreSQL server for the tests: ``initdb`` in a temporary folder, ``postgres``
on a free loopback port, every statement logged to a file the tests read.

PostgreSQL refuses to run as root, so when the tests run as root the folder is given
to the ``postgres`` user and the server runs under ``setpriv`` as that user (it execs
the server, so the PID we hold is the postmaster's). The server
is stopped by PID (SIGINT: PostgreSQL's fast shutdown) and the folder removed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .server import free_port

__all__ = ["PostgresServer", "available", "postgres_server"]

_BIN_DIRS = [Path("/usr/local/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"))]
USER = "postgres"  # the OS user the server runs as when we are root
ROLE = "service"  # the database role the tests connect as
DATABASE = "service"


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in _BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    return None


def available() -> bool:
    """Whether initdb, postgres and psql are installed (.ci/run installs them)."""
    return all(_binary(name) for name in ("initdb", "postgres", "psql"))


class PostgresServer:
    """A running server: its URL, its statement log, and a few tools."""

    def __init__(self, root: Path, port: int, as_user: list[str]) -> None:
        self.root = root
        self.port = port
        self.data = root / "pgdata"
        self.socket_dir = root / "socket"
        self.log_file = root / "postgres.log"
        self._as_user = as_user
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start ``postgres`` and wait until it accepts connections."""
        postgres = _binary("postgres")
        assert postgres is not None
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            [
                *self._as_user,
                postgres,
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.socket_dir}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "log_statement=all",
                "-c",
                "log_destination=stderr",
                "-c",
                "log_line_prefix=%m [%p] %a: ",
                "-c",
                "max_connections=100",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_file.read_text()[-2000:]}")
            ok = subprocess.run(
                self._psql("postgres", "SELECT 1"), capture_output=True, check=False, timeout=30
            )
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not start: {self.log_file.read_text()[-2000:]}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by PID, then wait for it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def psql(self, sql: str, database: str = DATABASE) -> str:
        """Run SQL with ``psql`` as an operator would (stops on the first error)."""
        done = subprocess.run(
            self._psql(database, sql),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    def _psql(self, database: str, sql: str) -> list[str]:
        """psql's command line: this server, one command, unaligned tuples only."""
        return [
            *(_binary("psql") or "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"),
            *("-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE, "-d", database),
            *("-At", "-c", sql),
        ]

    def create_database(self, name: str) -> str:
        """A fresh, empty database; returns its URL."""
        self.psql(f'CREATE DATABASE "{name}"', database="postgres")
        return self.url(name)

    def log_lines(self) -> list[str]:
        """The server's log (every statement, with ``log_statement=all``)."""
        return self.log_file.read_text(errors="replace").splitlines()


def _init(root: Path) -> list[str]:
    """initdb (as ``postgres`` when we are root); returns the prefix that runs a
    command as the server's user."""
    as_user: list[str] = []
    if os.geteuid() == 0:
        entry = pwd.getpwnam(USER)
        for path in [root, *root.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        # setpriv execs the command itself, so the PID we hold is the server's.
        as_user = [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--init-groups",
            "--",
        ]
    initdb = _binary("initdb")
    assert initdb is not None
    subprocess.run(
        [
            *as_user,
            initdb,
            "-D",
            str(root / "pgdata"),
            "-U",
            ROLE,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return as_user


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh server with an empty database ``service``; stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix="qs-pg-"))
    root.chmod(0o755)
    (root / "socket").mkdir()
    server: PostgresServer | None = None
    try:
        as_user = _init(root)
        server = PostgresServer(root, free_port(), as_user)
        if as_user:
            (root / "postgres.log").touch()
            entry = pwd.getpwnam(USER)
            os.chown(root / "postgres.log", entry.pw_uid, entry.pw_gid)
        server.start()
        server.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
