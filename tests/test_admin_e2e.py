"""The admin API against real Hypercorn workers: parameters checked by the engine when
written, one model read and deleted, secrets never returned, private database files,
and a model served by every worker as soon as its write answers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from quart_service.data.sqlite import private_database

from .support.server import Server, pin_workers, running_server

TOKEN = "admin-e2e-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORKERS = 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("admin") / "data"


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[Server]:
    # The default refresh_interval (2 s) on purpose: a write must not wait for it.
    env = {
        "QUART_SERVICE_ADMIN_TOKEN": TOKEN,
        "QUART_SERVICE_DATA_DIR": str(data_dir),
        "QUART_SERVICE_ACCESS_LOG": "0",
    }
    with running_server(
        data_dir.parent, app="quart_service.app:app", workers=WORKERS, env=env
    ) as running:
        yield running
    assert "Traceback" not in running.log()


@pytest.fixture(scope="module")
def workers(server: Server) -> Iterator[dict[int, httpx.Client]]:
    clients = pin_workers(server, WORKERS)
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture(scope="module")
def admin(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        yield client


def _chat(client: httpx.Client, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "We"}], "max_tokens": 2}
    return client.post("/v1/chat/completions", json=body)


def _stored(data_dir: Path, name: str) -> dict[str, Any] | None:
    """The row's parameters as the database holds them (read-only, like an operator)."""
    uri = (data_dir / "quart_service.db").resolve().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        row = db.execute("SELECT parameters FROM models WHERE name = ?", (name,)).fetchone()
    return None if row is None else dict(json.loads(row[0]))


BAD_CREATES: list[tuple[dict[str, Any], str]] = [
    ({"engine": "local", "parameters": {"tokens_per_second": "fast"}},
     "parameters.tokens_per_second"),
    ({"engine": "local", "parameters": {"temperatur": 1}}, "parameters.temperatur"),
    ({"engine": "local", "parameters": {"order": True}}, "parameters.order"),
    ({"engine": "local", "parameters": {"order": 9}}, "parameters.order"),
    ({"engine": "local", "parameters": {"corpus": "too short"}}, "parameters.corpus"),
    ({"engine": "upstream", "parameters": {}}, "parameters.base_url"),
    ({"engine": "upstream", "parameters": {"base_url": "ftp://x"}}, "parameters.base_url"),
    ({"engine": "neural", "parameters": {"weights": "w.safetensors", "max_batch": -1}},
     "parameters.max_batch"),
    ({"engine": "no-such-engine"}, "engine"),
    ({"engine": "local", "colour": "red"}, "colour"),
]  # fmt: skip


def test_parameters_are_checked_by_the_engine_when_a_model_is_written(
    admin: httpx.Client,
) -> None:
    for body, param in BAD_CREATES:
        refused = admin.post("/admin/models", json={"name": "checked", **body})
        assert refused.status_code == 400, (body, refused.text)
        error = refused.json()["error"]
        assert error["param"] == param, (body, error)
        assert param in error["message"]
    assert admin.get("/admin/models/checked").status_code == 404  # nothing was stored

    assert (
        admin.post("/admin/models", json={"name": "checked", "engine": "local"}).status_code == 201
    )
    bad = admin.patch("/admin/models/checked", json={"parameters": {"tokens_per_second": "x"}})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "parameters.tokens_per_second"
    # The stored parameters ({}) do not suit the new engine.
    switched = admin.patch("/admin/models/checked", json={"engine": "upstream"})
    assert switched.status_code == 400
    assert switched.json()["error"]["param"] == "parameters.base_url"
    assert admin.patch("/admin/models/checked", json={"engine": None}).status_code == 400
    assert admin.patch("/admin/models/checked", json={}).status_code == 400
    good = admin.patch("/admin/models/checked", json={"parameters": {"order": 2.0}})
    assert good.status_code == 200, good.text
    assert admin.get("/admin/models/checked").json()["parameters"] == {"order": 2.0}


def test_a_model_answers_on_every_worker_as_soon_as_its_write_does(
    admin: httpx.Client, workers: dict[int, httpx.Client], server: Server
) -> None:
    for n in range(3):
        name = f"fresh-{n}"
        created = admin.post("/admin/models", json={"name": name, "engine": "local"})
        assert created.status_code == 201, created.text
        for pid, client in workers.items():
            answer = _chat(client, name)
            assert answer.status_code == 200, (pid, answer.text)
        assert created.headers["X-Model-Visible"] == "true"
        # New connections land on any worker: all of them serve it.
        for _ in range(4):
            with httpx.Client(base_url=server.url, timeout=30) as fresh:
                assert _chat(fresh, name).status_code == 200
        disabled = admin.patch(f"/admin/models/{name}", json={"enabled": False})
        assert disabled.headers["X-Model-Visible"] == "true"
        for client in workers.values():
            assert _chat(client, name).status_code == 404


def test_one_model_is_read_and_deleted_and_a_running_stream_finishes(
    admin: httpx.Client, workers: dict[int, httpx.Client], server: Server
) -> None:
    body = {"name": "org/short-lived", "engine": "local", "parameters": {"tokens_per_second": 40}}
    created = admin.post("/admin/models", json=body)
    assert created.status_code == 201
    one = admin.get("/admin/models/org/short-lived")
    assert one.status_code == 200
    assert one.json() == created.json()
    assert admin.get("/admin/models/no-such-model").status_code == 404

    # A stream of 20 paced tokens (0.5 s) is running when its model is deleted.
    events: list[str] = []
    request = {
        "model": "org/short-lived",
        "messages": [{"role": "user", "content": "We"}],
        "max_tokens": 20,
        "stream": True,
    }
    started = threading.Event()

    def consume() -> None:
        with (
            httpx.Client(base_url=server.url, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=request) as reply,
        ):
            for line in reply.iter_lines():
                started.set()
                if line.startswith("data:"):
                    events.append(line)

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(10)
    deleted = admin.delete("/admin/models/org/short-lived")
    reader.join(30)
    assert deleted.status_code == 200
    assert deleted.json()["name"] == "org/short-lived"
    assert deleted.headers["X-Model-Visible"] == "true"
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 20  # every token came

    assert admin.get("/admin/models/org/short-lived").status_code == 404
    assert "org/short-lived" not in [m["name"] for m in admin.get("/admin/models").json()["models"]]
    for client in workers.values():
        assert _chat(client, "org/short-lived").status_code == 404
    assert admin.delete("/admin/models/org/short-lived").status_code == 404
    # Deleted, not disabled: the name is free again.
    assert admin.post("/admin/models", json=body).status_code == 201


def test_secrets_are_write_only_and_the_database_files_private(
    admin: httpx.Client, server: Server, data_dir: Path
) -> None:
    secret = f"sk-{uuid.uuid4().hex}"
    upstream = {"base_url": "http://127.0.0.1:9/v1", "api_key": secret}
    created = admin.post(
        "/admin/models", json={"name": "proxied", "engine": "upstream", "parameters": upstream}
    )
    assert created.status_code == 201, created.text
    assert created.json()["parameters"] == {**upstream, "api_key": "***"}
    answers = [
        created,
        admin.get("/admin/models/proxied"),
        admin.get("/admin/models"),
        # Sent back as shown, the secret keeps its stored value.
        admin.patch(
            "/admin/models/proxied",
            json={
                "parameters": {**upstream, "base_url": "http://127.0.0.1:10/v1", "api_key": "***"}
            },
        ),
    ]
    for answer in answers:
        assert answer.status_code in (200, 201)
        assert secret not in answer.text
    assert _stored(data_dir, "proxied") == {
        "base_url": "http://127.0.0.1:10/v1",
        "api_key": secret,
    }
    # '***' stands for a stored value: there is none for a new model.
    refused = admin.post(
        "/admin/models",
        json={"name": "p2", "engine": "upstream", "parameters": {**upstream, "api_key": "***"}},
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "parameters.api_key"
    deleted = admin.delete("/admin/models/proxied")
    assert secret not in deleted.text
    assert secret not in server.log()

    # The database, its WAL and shm, and every published copy of the table: this user's.
    files = [data_dir / f"quart_service.db{suffix}" for suffix in ("", "-wal", "-shm")]
    files += list((data_dir / "datasets").rglob("*.sqlite"))
    assert len(files) > 3
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


def test_an_older_world_readable_database_is_made_private(tmp_path: Path) -> None:
    database = tmp_path / "old.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").write_bytes(b"")
        os.chmod(f"{database}{suffix}", 0o644)
    private_database(database)
    for suffix in ("", "-wal", "-shm"):
        assert stat.S_IMODE(os.stat(f"{database}{suffix}").st_mode) == 0o600
    fresh = tmp_path / "new.db"
    old_umask = os.umask(0o022)
    try:
        private_database(fresh, create=True)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("factory", "sources"),
    [
        ("quart_service.engines.local:create", ["local.py"]),
        ("quart_service.engines.upstream:create", ["upstream.py"]),
        ("quart_service.engines.neural:create", ["neural/engine.py", "neural/_entry.py"]),
    ],
)
def test_every_parameter_an_engine_reads_is_declared(factory: str, sources: list[str]) -> None:
    # The admin API refuses undeclared parameters: one the engine reads but does not
    # declare could never be set through it.
    from quart_service.engines import parameters as declared_parameters
    from quart_service.plugins.loader import import_string

    schema = declared_parameters.parameters_schema(import_string(factory))
    assert schema is not None
    folder = Path(declared_parameters.__file__).parent
    read: set[str] = set()
    for source in sources:
        text = (folder / source).read_text()
        read |= set(re.findall(r"parameters\.get\(\s*\"(\w+)\"", text))
        read |= set(re.findall(r"_(?:count|number)\(\s*parameters,\s*\"(\w+)\"", text))
    assert read, "no parameter reads found: the patterns above are out of date"
    assert read <= set(schema.model_fields), read - set(schema.model_fields)
