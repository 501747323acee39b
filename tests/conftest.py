"""Shared fixtures: an in-process app (lifespan run) and helpers for event files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestAppProtocol as RunningApp

from quart_service import Settings, create_app

from .support.data import Backend
from .support.postgres import PostgresServer, postgres_server
from .support.postgres import available as postgres_available
from .support.redis import RedisServer, running_redis

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "team_blueprint"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Defaults with the identity endpoint on and the data in a fresh folder."""
    return Settings(identity_endpoint=True, data_dir=str(tmp_path / "data"))


@pytest.fixture
def app(settings: Settings) -> Quart:
    return create_app(settings)


@pytest.fixture
async def test_app(app: Quart) -> AsyncIterator[RunningApp]:
    """The app with its lifespan running (before_serving / after_serving)."""
    async with app.test_app() as running:
        yield running


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines that test apps appended to ``path``."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def team_package() -> Iterator[Path]:
    """pip-install the example team package as a real distribution, then remove it."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", str(EXAMPLE)], check=True, timeout=300)
    try:
        yield EXAMPLE
    finally:
        subprocess.run([*pip, "uninstall", "-y", "team-blueprint-example"], check=True, timeout=300)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real ``redis-server`` for the session (loopback, free port, no persistence)."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test (FLUSHALL over a raw socket)."""
    redis_server.start()  # in case a test stopped it
    redis_server.flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (skipped when not installed;
    .ci/run installs it)."""
    if not postgres_available():
        pytest.skip("PostgreSQL (initdb, postgres, psql) is not installed")
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on the session's server; its URL."""
    name = "t_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]
    postgres.psql(f'DROP DATABASE IF EXISTS "{name}"', database="postgres")
    return postgres.create_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each database backend in turn (PostgreSQL: a fresh database on the session's
    server), for the data-plane tests that must hold on both."""
    data_dir = tmp_path / "data"
    if request.param == "sqlite":
        return Backend("sqlite", data_dir)
    server: PostgresServer = request.getfixturevalue("postgres")
    url: str = request.getfixturevalue("pg_url")
    return Backend("postgresql", data_dir, url, server)
