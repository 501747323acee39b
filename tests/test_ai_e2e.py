"""The OpenAI-compatible API against real Hypercorn workers, with the official client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from .support.admin import create_model
from .support.data import wait_all
from .support.server import Server, pinned_workers, running_server

TOKEN = "test-admin-token"
INTERVAL = 0.5
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _env(tmp_path: Path, name: str = "data") -> dict[str, str]:
    return {
        "QUART_SERVICE_DATA_DIR": str(tmp_path / name),
        "QUART_SERVICE_REFRESH_INTERVAL": str(INTERVAL),
        "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
        "QUART_SERVICE_ADMIN_TOKEN": TOKEN,
    }


def _wait_model(clients: dict[int, httpx.Client], name: str, parameters: dict[str, Any]) -> None:
    wait_all(clients, "/data", lambda a: a["models"].get(name) == parameters, timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with the default settings of this module (admin on), for the tests
    that only add their own models to it: each checks what its own requests did."""
    tmp_path = tmp_path_factory.mktemp("ai")
    with running_server(tmp_path, workers=2, env=_env(tmp_path)) as server:
        yield server


def test_official_openai_client_streams_what_it_gets_whole(server: Server) -> None:
    with OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        assert "local-ngram" in [m.id for m in client.models.list()]
        messages: Any = [{"role": "user", "content": "that government of the people"}]
        whole = client.chat.completions.create(
            model="local-ngram", messages=messages, max_tokens=40, seed=7
        )
        text = whole.choices[0].message.content
        assert text
        assert whole.choices[0].finish_reason == "length"
        assert whole.usage is not None
        assert whole.usage.completion_tokens == 40
        streamed = client.chat.completions.create(
            model="local-ngram",
            messages=messages,
            max_tokens=40,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage = [], None, None
        for chunk in streamed:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(pieces) == text
        assert finish == "length"
        assert usage is not None
        assert usage.completion_tokens == 40
        # Text completions, whole and streamed, agree too; a stop sequence cuts both.
        done = client.completions.create(
            model="local-ngram", prompt="We the People", max_tokens=25, seed=3, stop=["."]
        )
        parts = [
            c.choices[0].text
            for c in client.completions.create(
                model="local-ngram",
                prompt="We the People",
                max_tokens=25,
                seed=3,
                stop=["."],
                stream=True,
            )
            if c.choices
        ]
        assert "".join(parts) == done.choices[0].text
        assert "." not in done.choices[0].text


BAD_INPUTS: list[tuple[str, bytes, int, str | None]] = [
    ("malformed json", b'{"model": "local-ngram", "messages": [', 400, None),
    ("wrong type", b'{"model": "local-ngram", "messages": "hi"}', 400, "messages"),
    ("missing messages", b'{"model": "local-ngram"}', 400, "messages"),
    (
        "negative max_tokens",
        b'{"model": "local-ngram", "messages": [{"role": "user", "content": "x"}], '
        b'"max_tokens": -5}',
        400,
        "max_tokens",
    ),
    (
        "huge max_tokens",
        b'{"model": "local-ngram", "messages": [{"role": "user", "content": "x"}], '
        b'"max_tokens": 10000000000}',
        400,
        "max_tokens",
    ),
    ("invalid utf-8", b'{"model": "\xff\xfe", "messages": []}', 400, None),
    (
        "unknown model",
        b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
        404,
        "model",
    ),
]


def test_bad_inputs_get_openai_shaped_errors_and_the_service_keeps_serving(
    server: Server,
) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for label, body, status, param in BAD_INPUTS:
            response = http.post(
                "/v1/chat/completions",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            assert response.status_code == status, (label, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, label
            assert error["param"] == param, (label, error)
            assert "Traceback" not in response.text
        big = http.post(
            "/v1/chat/completions",
            content=b"x" * (20 * 1024 * 1024),
            headers={"Content-Type": "application/json"},
        )
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "request_too_large"
        assert http.get("/admin/models").status_code == 401
        wrong = http.get("/admin/models", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "unauthorized"
        assert http.get("/admin/models", headers=ADMIN).status_code == 200
        assert http.get("/livez").status_code == 200
        ok = http.post(
            "/v1/chat/completions",
            json={"model": "local-ngram", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert ok.status_code == 200


def test_admin_api_is_off_without_a_token(tmp_path: Path) -> None:
    env = {**_env(tmp_path), "QUART_SERVICE_ADMIN_TOKEN": ""}
    with running_server(tmp_path, workers=2, env=env) as server:
        assert httpx.get(server.url + "/admin/models", headers=ADMIN).status_code == 404


def _engine_ids(client: httpx.Client) -> dict[str, str]:
    engines = client.get("/debug/identity").json()["ai"]["engines"]
    return {e["model"]: e["instance_id"] for e in engines}


def _complete(client: httpx.Client, model: str) -> str:
    response = client.post(
        "/v1/completions", json={"model": model, "prompt": "Four score", "max_tokens": 5, "seed": 1}
    )
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["text"]
    return text


def test_admin_update_reaches_every_worker_and_rebuilds_only_that_engine(
    server: Server,
) -> None:
    with pinned_workers(server, 2) as clients:
        create_model(server.url, TOKEN, "a", "local", {"order": 2})
        create_model(server.url, TOKEN, "b", "local", {"order": 3})
        _wait_model(clients, "a", {"order": 2})
        _wait_model(clients, "b", {"order": 3})
        before = {}
        for pid, client in clients.items():
            _complete(client, "a")
            _complete(client, "b")
            before[pid] = _engine_ids(client)
        corpus = "alpha beta gamma. alpha beta delta. alpha beta gamma."
        started = time.monotonic()
        patched = httpx.patch(
            server.url + "/admin/models/a",
            json={"parameters": {"order": 2, "corpus": corpus}},
            headers=ADMIN,
            timeout=10,
        )
        assert patched.status_code == 200, patched.text
        _wait_model(clients, "a", {"order": 2, "corpus": corpus})
        assert time.monotonic() - started <= INTERVAL + 0.5 + 0.5  # + the HTTP round trip
        for pid, client in clients.items():
            assert set(_complete(client, "a").split()) <= {
                "alpha",
                "beta",
                "gamma.",
                "delta.",
                "gamma",
                "delta",
                ".",
            }
            _complete(client, "b")
            after = _engine_ids(client)
            assert after["a"] != before[pid]["a"]  # rebuilt with the new parameters
            assert after["b"] == before[pid]["b"]  # untouched
        # Disabled: 404 everywhere within the interval.
        assert httpx.delete(server.url + "/admin/models/a", headers=ADMIN).status_code == 200
        wait_all(clients, "/v1/models", lambda a: "a" not in [m["id"] for m in a["data"]], 5)


def _stream_text(url: str, model: str, **extra: Any) -> str:
    body = {"model": model, "prompt": "We hold these truths", "max_tokens": 30, "seed": 11,
            "stream": True, **extra}  # fmt: skip
    pieces: list[str] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                pieces.extend(c["text"] for c in choices)
    return "".join(pieces)


@pytest.mark.slow
def test_upstream_engine_proxies_a_second_instance_and_stops_it_on_disconnect(
    tmp_path: Path, server: Server
) -> None:
    upstream = server
    with (
        pinned_workers(upstream, 2) as upstream_workers,
        running_server(tmp_path, workers=2, env=_env(tmp_path, "front")) as front,
        pinned_workers(front, 2) as front_workers,
    ):
        create_model(upstream.url, TOKEN, "paced", "local", {"tokens_per_second": 20})
        _wait_model(upstream_workers, "paced", {"tokens_per_second": 20})
        base = {"base_url": upstream.url + "/v1", "model": "local-ngram"}
        create_model(front.url, TOKEN, "proxied", "upstream", base)
        create_model(front.url, TOKEN, "proxied-paced", "upstream", {**base, "model": "paced"})
        _wait_model(front_workers, "proxied-paced", {**base, "model": "paced"})

        assert _stream_text(front.url, "proxied") == _stream_text(upstream.url, "local-ngram")

        def disconnects() -> int:
            return sum(
                c.get("/debug/identity").json()["streams"]["disconnected"]
                for c in upstream_workers.values()
            )

        before = disconnects()
        body = {"model": "proxied-paced", "prompt": "x", "max_tokens": 400, "stream": True}
        with httpx.stream("POST", front.url + "/v1/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            assert sum(1 for _, line in zip(range(12), lines, strict=False) if line) > 2
        left = time.monotonic()
        while disconnects() == before and time.monotonic() - left < 3:
            time.sleep(0.02)
        assert disconnects() == before + 1
        assert time.monotonic() - left < 1.0


@pytest.mark.slow
def test_a_stream_longer_than_the_response_timeout_reaches_the_openai_client_whole(
    tmp_path: Path,
) -> None:
    # Quart's RESPONSE_TIMEOUT (60 s by default) would cut any response that outlives
    # it; streams are exempt. Shown with a 2 s timeout and a 5 s stream.
    env = {**_env(tmp_path), "QUART_SERVICE_RESPONSE_TIMEOUT": "2"}
    with (
        running_server(tmp_path, workers=2, env=env) as server,
        pinned_workers(server, 2) as clients,
    ):
        create_model(server.url, TOKEN, "slow", "local", {"tokens_per_second": 5})
        _wait_model(clients, "slow", {"tokens_per_second": 5})
        started = time.monotonic()
        with OpenAI(
            base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60
        ) as client:
            chunks = 0
            finish = None
            for chunk in client.completions.create(
                model="slow", prompt="Now we are engaged", max_tokens=25, stream=True
            ):
                if chunk.choices and chunk.choices[0].text:
                    chunks += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            assert chunks == 25
            assert finish == "length"
            assert time.monotonic() - started >= 4.5
