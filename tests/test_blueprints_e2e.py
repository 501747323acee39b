"""Team blueprints from a real installed distribution, and a mounted Flask app,
under real Hypercorn workers."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from .support.server import free_port, peak_threads, running_server, spawn_hypercorn

# The example team package, pip-installed as a real distribution for this module.
pytestmark = pytest.mark.usefixtures("team_package")


def test_flask_habits_work_in_a_team_blueprint(tmp_path: Path) -> None:
    env = {"QUART_SERVICE_IDENTITY_ENDPOINT": "1"}
    with (
        running_server(tmp_path, workers=2, env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        hello = http.get("/team/hello")
        assert hello.status_code == 200
        assert hello.headers["x-team"] == "example"  # after_request
        assert hello.json() == {"message": "hello", "started": True, "url": "/team/items/7"}
        assert http.get("/team/items/5").json() == {"item_id": 5, "kind": "int"}
        missing = http.get("/team/items/500")  # abort(404) -> the team's error handler
        assert missing.status_code == 404
        assert missing.json() == {"team_error": "no such item"}
        assert http.get("/team/items/abc").status_code == 404  # the int converter
        echoed = http.post("/team/echo", params={"q": "1"}, json={"a": [1, 2]}).json()
        assert echoed == {"method": "POST", "args": {"q": "1"}, "json": {"a": [1, 2]},
                          "form": {}, "files": {}}  # fmt: skip
        posted = http.put("/team/echo", data={"name": "x"}, files={"f": b"12345"}).json()
        assert posted["form"] == {"name": "x"}
        assert posted["files"] == {"f": 5}
        assert http.delete("/team/echo").status_code == 405
        for _ in range(10):
            assert http.get("/team/blocking").json()["thread"].startswith("quart-service-pool")
        assert http.get("/team/stream").text.count("data: ") == 3
        identity = http.get("/debug/identity").json()
        assert identity["plugins"]["mounted"] == {"team-example": "/team"}


def test_team_singleton_exists_once_per_worker(tmp_path: Path) -> None:
    with running_server(tmp_path, workers=2) as server:

        async def burst() -> list[dict[str, object]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                answers = await asyncio.gather(*(client.get("/team/index") for _ in range(100)))
            return [a.json() for a in answers]

        answers = asyncio.run(burst())
        for _ in range(200):
            if len({a["pid"] for a in answers}) == 2:
                break
            answers.append(httpx.get(server.url + "/team/index", timeout=10).json())
    ids: dict[object, set[object]] = defaultdict(set)
    for answer in answers:
        ids[answer["pid"]].add(answer["instance_id"])
    assert len(ids) == 2
    assert all(len(v) == 1 for v in ids.values())
    assert len({next(iter(v)) for v in ids.values()}) == 2


def test_a_broken_plugin_is_skipped_and_reported(tmp_path: Path) -> None:
    env = {"QUART_SERVICE_BLUEPRINTS": "tests.apps.broken_plugin:bp",
           "QUART_SERVICE_IDENTITY_ENDPOINT": "1"}  # fmt: skip
    with running_server(tmp_path, workers=2, env=env) as server:
        ready = httpx.get(server.url + "/readyz", timeout=10).json()
        skipped = ready["checks"]["plugins"]["skipped"]
        assert "missing_lib" in skipped["tests.apps.broken_plugin:bp"]
        # The rest of the service, the other team's blueprint included, serves.
        assert httpx.get(server.url + "/team/hello", timeout=10).status_code == 200


def _refused(tmp_path: Path, env: dict[str, str]) -> str:
    log_path = tmp_path / "refused.log"
    process = spawn_hypercorn(
        "quart_service.app:app", port=free_port(), workers=2, env=env, log_path=log_path
    )
    try:
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return log_path.read_text()


def test_strict_setting_refuses_to_start_with_a_broken_plugin(tmp_path: Path) -> None:
    env = {
        "QUART_SERVICE_BLUEPRINTS": "tests.apps.broken_plugin:bp",
        "QUART_SERVICE_PLUGIN_FAILURE": "fail",
        "QUART_SERVICE_DATA_DIR": str(tmp_path / "data"),
    }
    log = _refused(tmp_path, env)
    assert "team blueprint 'tests.apps.broken_plugin:bp' failed to load" in log
    assert "Traceback" not in log


def test_a_route_collision_is_refused_naming_both(tmp_path: Path) -> None:
    env = {
        "QUART_SERVICE_BLUEPRINTS": "tests.apps.colliding_plugin:bp",
        "QUART_SERVICE_DATA_DIR": str(tmp_path / "data"),
    }
    log = _refused(tmp_path, env)
    assert "route collision: /team/hello (GET)" in log
    assert "'team-example'" in log
    assert "'tests.apps.colliding_plugin:bp'" in log


def test_mounted_flask_app_serves_on_the_pool_and_contains_its_errors(tmp_path: Path) -> None:
    pool = 8
    env = {
        "QUART_SERVICE_WSGI_MOUNTS": "/legacy=examples.legacy_flask.app:app",
        "QUART_SERVICE_EXECUTOR_THREADS": str(pool),
        "QUART_SERVICE_EXECUTOR_QUEUE": "500",
    }
    with (
        running_server(tmp_path, workers=2, env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        home = http.get("/legacy/").json()
        assert home["app"] == "legacy"
        assert home["path"] == "/"
        assert home["thread"].startswith("quart-service-pool")
        upload = http.post("/legacy/upload", content=b"x" * (1024 * 1024))
        assert upload.json() == {"received": 1024 * 1024}
        assert http.post("/legacy/upload", content=b"x" * (17 * 1024 * 1024)).status_code == 413
        assert http.get("/legacy/boom").status_code == 500
        assert http.get("/livez").status_code == 200
        assert http.get("/legacy/").status_code == 200

        async def hundred() -> list[int]:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as c:
                answers = await asyncio.gather(*(c.get("/legacy/") for _ in range(100)))
            return [a.status_code for a in answers]

        with peak_threads(server.worker_pids()) as peak:
            assert asyncio.run(hundred()) == [200] * 100
        assert all(0 < n <= pool + 1 + 2 for n in peak.values()), peak
