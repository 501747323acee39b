"""Limits and protection, against the real Hypercorn with the shipped hypercorn.toml."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.server import Server, running_server

APP = "quart_service.app:app"


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service on its defaults (no CORS origins, no admin token), for the tests
    that check what is off unless configured; they only read from it."""
    with running_server(tmp_path_factory.mktemp("plain"), app=APP) as server:
        yield server


def _raw(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes and read until the server closes or ``timeout`` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
        return received


def test_oversized_bodies_heads_and_urls_are_refused_without_a_traceback(
    tmp_path: Path,
) -> None:
    env = {"QUART_SERVICE_MAX_BODY_SIZE": "4096"}
    with running_server(tmp_path, app=APP, env=env) as server:
        big = {"model": "local-ngram", "messages": [{"role": "user", "content": "x" * 8000}]}
        response = httpx.post(server.url + "/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"]
        # The same limit holds when the client streams the body without a length.
        chunks = (b"x" * 1024 for _ in range(16))
        response = httpx.post(server.url + "/v1/completions", content=chunks)
        assert response.status_code == 413
        # Headers over max_header_size (16 KiB): 431; a URL over max_url_length: 414.
        huge = {"X-Big": "a" * 20000}
        response = httpx.get(server.url + "/livez", headers=huge)
        assert response.status_code == 431
        assert response.json()["error"]["code"] == "headers_too_large"
        response = httpx.get(server.url + "/livez?q=" + "q" * 9000)
        assert response.status_code == 414
        assert response.json()["error"]["code"] == "url_too_long"
        # A head Hypercorn cannot even buffer (over h11_max_incomplete_size, sent in
        # pieces over 64 KiB) is refused by Hypercorn itself with 431 and closed.
        head = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        assert _raw(server.port, head).startswith(b"HTTP/1.1 431")
        # A malformed request line is refused the same way; the workers live on.
        assert _raw(server.port, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert httpx.get(server.url + "/livez").status_code == 200
        assert "Traceback" not in server.log()


def test_idle_keep_alive_connections_are_closed_after_keep_alive_timeout(
    tmp_path: Path,
) -> None:
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "uvloop"\nkeep_alive_timeout = 1\n')
    with running_server(tmp_path, app=APP, config=config) as server:
        started = time.monotonic()
        answer = _raw(server.port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
        closed_after = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 200")
        assert 0.9 < closed_after < 5  # closed by the server, not by our timeout


def test_cors_is_off_unless_origins_are_configured(tmp_path: Path, plain: Server) -> None:
    origin = {"Origin": "https://app.example"}
    response = httpx.get(plain.url + "/v1/models", headers=origin)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    env = {"QUART_SERVICE_CORS_ALLOW_ORIGINS": "https://app.example"}
    with running_server(tmp_path, app=APP, env=env) as server:
        response = httpx.get(server.url + "/v1/models", headers=origin)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "X-Request-ID" in response.headers["access-control-expose-headers"]
        other = httpx.get(server.url + "/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = httpx.options(
            server.url + "/v1/chat/completions",
            headers={**origin, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]


def test_admin_api_needs_its_token_and_is_absent_without_one(tmp_path: Path, plain: Server) -> None:
    assert httpx.get(plain.url + "/admin/models").status_code == 404
    env = {"QUART_SERVICE_ADMIN_TOKEN": "s3cret-token"}
    with running_server(tmp_path, app=APP, env=env) as server:
        assert httpx.get(server.url + "/admin/models").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.get(server.url + "/admin/models", headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret-token"}
        assert httpx.get(server.url + "/admin/models", headers=right).status_code == 200
