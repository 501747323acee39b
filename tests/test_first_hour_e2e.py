"""A newcomer's first hour (issue 15), against one real ``quart-service serve`` with
two workers: what the logs say, what a mounted Flask app's failure looks like, what
the 413 says; and the refusals that need no server (serve from another folder, a
bad key in the settings file)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from quart_service import Settings, SettingsError
from tests.support.server import Server, running_server, server_env, wait_for

APP = "quart_service.app:app"
WSGI_LIMIT = 2000
ENV = {
    "QUART_SERVICE_LOG_FORMAT": "json",
    "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
    "QUART_SERVICE_MAX_BODY_SIZE": "4096",
    "QUART_SERVICE_WSGI_MOUNTS": "/legacy=examples.legacy_flask.app:app",
    "QUART_SERVICE_WSGI_MAX_BODY_SIZE": str(WSGI_LIMIT),
}
# ISO 8601 to the millisecond, with the offset from UTC.
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(
        tmp_path_factory.mktemp("first-hour"), app=APP, env=ENV, command="serve"
    ) as running:
        yield running


def _records(server: Server) -> list[dict[str, Any]]:
    """The service's JSON lines (Hypercorn's own "Running on" lines are text)."""
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def _messages(server: Server, logger: str) -> list[str]:
    return [r["message"] for r in _records(server) if r["logger"] == logger]


def test_json_log_times_are_iso_8601_with_milliseconds(server: Server) -> None:
    httpx.get(server.url + "/livez")
    records = wait_for(lambda: _records(server), "JSON log lines")
    bad = [r["time"] for r in records if not ISO_MS.match(r["time"])]
    assert not bad


def test_the_access_log_names_the_client_address_and_user_agent(server: Server) -> None:
    headers = {"User-Agent": "first-hour-test/1.0", "X-Request-ID": "ua-check-1"}
    assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 200

    def line() -> dict[str, Any] | None:
        found = [r for r in _records(server) if r.get("request_id") == "ua-check-1"]
        return next((r for r in found if r["logger"] == "quart_service.access"), None)

    record = wait_for(line, "the access line of the request")
    assert record is not None
    assert record["client"] == "127.0.0.1"
    assert record["user_agent"] == "first-hour-test/1.0"
    assert 'client=127.0.0.1 ua="first-hour-test/1.0"' in record["message"]


def test_a_mounted_flask_apps_error_is_in_the_service_log_with_the_request_id(
    server: Server,
) -> None:
    response = httpx.get(server.url + "/legacy/boom", headers={"X-Request-ID": "flask-boom-1"})
    assert response.status_code == 500

    def error() -> dict[str, Any] | None:
        return next(
            (
                r
                for r in _records(server)
                if r["level"] == "ERROR" and r.get("request_id") == "flask-boom-1"
            ),
            None,
        )

    record = wait_for(error, "the Flask app's error as a service log record")
    assert record is not None
    assert record["logger"] == "quart_service.wsgi"
    assert "/legacy" in record["message"]
    assert "/boom" in record["message"]
    assert "RuntimeError: legacy code failed" in record["exc_info"]
    # Nothing in Flask's own format, outside the service's log lines.
    outside = [line for line in server.log().splitlines() if not line.startswith("{")]
    assert not [line for line in outside if "legacy code failed" in line or "ERROR in" in line]


def test_a_413_states_the_limit_also_for_a_chunked_body_to_a_mounted_app(
    server: Server,
) -> None:
    limit = f"{WSGI_LIMIT} bytes"
    big = b"x" * (WSGI_LIMIT + 1)
    # With a Content-Length, and streamed in chunks without one (Hypercorn's own
    # check answered an empty 400 to that).
    for body in (big, (big[i : i + 500] for i in range(0, len(big), 500))):
        response = httpx.post(server.url + "/legacy/upload", content=body)
        assert response.status_code == 413
        assert limit in response.json()["error"]["message"]
    # Under the limit, a chunked upload reaches the Flask app whole.
    small = (b"y" * 300 for _ in range(3))
    response = httpx.post(server.url + "/legacy/upload", content=small)
    assert response.json() == {"received": 900}
    # The service's own routes: max_body_size.
    response = httpx.post(server.url + "/v1/completions", content=b"z" * 5000)
    assert response.status_code == 413
    assert "4096 bytes" in response.json()["error"]["message"]


def test_the_start_up_log_lists_resources_blueprints_models_and_settings_sources(
    server: Server,
) -> None:
    identities = {}
    for _ in range(40):  # new connections until both workers answered
        body = httpx.get(server.url + "/debug/identity", headers={"Connection": "close"}).json()
        identities[body["pid"]] = body
        if len(identities) == 2:
            break
    assert len(identities) == 2
    wait_for(lambda: len(_models(server)) == 2, "both workers' models lines")
    messages = _messages(server, "quart_service")
    for pid, identity in identities.items():
        resources = [r["name"] for r in identity["resources"]]
        serving = next(m for m in messages if m.startswith(f"worker {pid} serving:"))
        assert serving.endswith(f"{len(resources)} resources: {', '.join(resources)}")
        config = next(m for m in messages if m.startswith(f"worker {pid} configuration:"))
        assert "settings from environment " in config
        assert "QUART_SERVICE_WSGI_MOUNTS" in config
        assert "v1 at /v1" in config
        assert "health at /" in config
        assert "WSGI mounts /legacy=examples.legacy_flask.app:app" in config
        assert f"worker {pid} models: local-ngram (local)" in messages
    serve = _messages(server, "quart_service.serve")
    assert any(m.startswith("server settings from /") and "hypercorn.toml" in m for m in serve)


def _models(server: Server) -> list[str]:
    return [m for m in _messages(server, "quart_service") if " models: " in m]


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quart_service.server.cli", *args],
        cwd=cwd,
        env=server_env(env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_refuses_to_start_without_its_server_file(tmp_path: Path) -> None:
    # From another folder: no hypercorn.toml there. It used to run on Hypercorn's
    # defaults (one worker) with a fresh ./data database in that folder.
    refused = _cli(["serve", "--bind", "127.0.0.1:1"], tmp_path, {})
    assert refused.returncode == 2
    assert f"no hypercorn.toml in {tmp_path}" in refused.stderr
    assert "--config PATH" in refused.stderr
    assert not (tmp_path / "data").exists()
    missing = _cli(["serve", "--config", "nowhere.toml"], tmp_path, {})
    assert missing.returncode == 2
    assert "nowhere.toml does not exist" in missing.stderr


def test_a_bad_key_or_value_in_the_settings_file_is_reported_as_from_that_file(
    tmp_path: Path,
) -> None:
    settings_file = tmp_path / "service.toml"
    env = {"QUART_SERVICE_CONFIG": str(settings_file)}
    settings_file.write_text("executor_thread = 8\n")
    bad_key = _cli(["check"], tmp_path, env)
    assert bad_key.returncode == 2
    assert f"unknown setting 'executor_thread' in the settings file {settings_file}" in (
        bad_key.stderr
    )
    assert "environment" not in bad_key.stderr.split("known settings")[0]
    settings_file.write_text('executor_threads = "many"\n')
    bad_value = _cli(["check"], tmp_path, env)
    assert bad_value.returncode == 2
    assert f"(from the settings file {settings_file}" in bad_value.stderr
    # The same value from the environment names the variable.
    with pytest.raises(SettingsError, match="from the environment variable QUART_SERVICE_"):
        Settings.from_env({**env, "QUART_SERVICE_EXECUTOR_THREADS": "-1"})


def _readme_curls() -> list[str]:
    """The curl commands of README.md's "watch a stream" block, continuation lines joined."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("in another terminal", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.startswith("curl")]


def test_the_readme_curls_show_a_paced_stream_and_a_bounded_one(server: Server) -> None:
    """README's first curls, run as written against a real server: one stream whose
    events arrive over time (a person sees it stream), and a chat stream that ends
    after at most the max_tokens it asks for."""
    curls = _readme_curls()
    paced = [c for c in curls if "-d " not in c]
    chat = [c for c in curls if "/v1/chat/completions" in c]
    assert paced, curls
    assert chat, curls
    url = re.search(r"'(http://127\.0\.0\.1:8000[^']+)'", paced[0])
    assert url is not None, paced[0]
    arrivals = []
    with httpx.stream("GET", url[1].replace("http://127.0.0.1:8000", server.url)) as answer:
        for line in answer.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic())
    assert len(arrivals) >= 5
    assert arrivals[-1] - arrivals[0] >= 1.0  # paced: spread over seconds, not one burst
    data = re.search(r"-d '(\{.*\})'", chat[0])
    assert data is not None, chat[0]
    body = json.loads(data[1])
    assert body["stream"] is True
    assert 1 <= body["max_tokens"] <= 64
    pieces = 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as answer:
        assert answer.status_code == 200
        lines = [line for line in answer.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        delta = json.loads(line[5:])["choices"][0]["delta"]
        pieces += bool(delta.get("content"))
    assert 1 <= pieces <= body["max_tokens"]
