"""Errors as clients see them, on a real Hypercorn with 2 workers.

Everything under /v1 answers in OpenAI's shape, so the official client raises its
usual exception types with a ``type``; everything else answers in the service's
shape. A shed request says the same ``Retry-After`` wherever it was refused.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai._types import RequestOptions

from .support.server import pin_workers, running_server

APP = "quart_service.app:app"


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_every_v1_error_has_openai_shape_and_the_official_client_parses_it(
    tmp_path: Path,
) -> None:
    env = {"QUART_SERVICE_MAX_BODY_SIZE": "4096"}
    with (
        running_server(tmp_path, app=APP, workers=2, env=env) as server,
        _client(server.url) as client,
    ):
        model = client.models.retrieve("local-ngram")
        assert (model.id, model.object, model.owned_by) == ("local-ngram", "model", "local")

        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve("no-such-model")
        assert (missing.value.type, missing.value.code) == (
            "invalid_request_error",
            "model_not_found",
        )

        with pytest.raises(openai.NotFoundError) as unknown:
            client.get("/no/such/path", cast_to=object)
        assert (unknown.value.type, unknown.value.code) == ("invalid_request_error", "not_found")
        assert "entered the URL manually" not in unknown.value.message

        with pytest.raises(openai.APIStatusError) as wrong_method:
            client.delete("/models", cast_to=object)
        assert wrong_method.value.status_code == 405
        assert (wrong_method.value.type, wrong_method.value.code) == (
            "invalid_request_error",
            "method_not_allowed",
        )
        assert "GET" in wrong_method.value.response.headers["allow"]

        long_url: RequestOptions = {"params": {"q": "a" * 9000}}
        with pytest.raises(openai.APIStatusError) as too_long:
            client.get("/models", cast_to=object, options=long_url)
        assert too_long.value.status_code == 414
        assert (too_long.value.type, too_long.value.code) == (
            "invalid_request_error",
            "url_too_long",
        )

        big_head: RequestOptions = {"headers": {"X-Big": "a" * 20000}}
        with pytest.raises(openai.APIStatusError) as too_big:
            client.get("/models", cast_to=object, options=big_head)
        assert too_big.value.status_code == 431
        assert too_big.value.type == "invalid_request_error"
        assert too_big.value.code == "headers_too_large"

        prompt = [{"role": "user", "content": "x" * 8000}]
        with pytest.raises(openai.APIStatusError) as body:
            client.chat.completions.create(model="local-ngram", messages=prompt)  # type: ignore[arg-type]
        assert body.value.status_code == 413
        assert body.value.code == "request_too_large"
        assert "4096 bytes" in body.value.message

        # Outside /v1: the service's own shape, with the status in the body.
        answer = httpx.get(server.url + "/no/such/path")
        assert answer.status_code == 404
        assert answer.json() == {
            "error": {
                "code": "not_found",
                "message": "No route for GET /no/such/path; see /openapi.json.",
                "status": 404,
            }
        }


@pytest.mark.slow
def test_a_shed_request_says_the_same_retry_after_wherever_it_is_refused(
    tmp_path: Path,
) -> None:
    # One pool thread and no queue: while it is busy, anything needing it is refused.
    env = {
        "QUART_SERVICE_EXECUTOR_THREADS": "1",
        "QUART_SERVICE_EXECUTOR_QUEUE": "0",
        "QUART_SERVICE_RETRY_AFTER": "1.4",
        "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
        "QUART_SERVICE_WSGI_MOUNTS": "/legacy=examples.legacy_flask.app:app",
    }
    with running_server(tmp_path, workers=2, env=env) as server:
        holders, probes = pin_workers(server, 2), pin_workers(server, 2)
        try:
            pid = next(iter(holders))
            holder, probe = holders[pid], probes[pid]
            assert probe.get("/livez").json()["pid"] == pid
            busy = threading.Thread(
                target=holder.get, args=("/block",), kwargs={"params": {"ms": 4000}}
            )
            busy.start()
            deadline = time.monotonic() + 5
            while probe.get("/debug/identity").json()["executor"]["active"] != 1:
                assert time.monotonic() < deadline, (
                    "the blocking request never took the pool thread"
                )
                time.sleep(0.02)

            chat = {"model": "local-ngram", "messages": [{"role": "user", "content": "hi"}]}
            refused = {
                "sync view": probe.get("/block"),
                "bridged stream": probe.get("/sync-stream"),
                "v1 API": probe.post("/v1/chat/completions", json=chat),
                "mounted WSGI app": probe.get("/legacy/"),
            }
            busy.join()
        finally:
            for client in [*holders.values(), *probes.values()]:
                client.close()
    for where, response in refused.items():
        assert response.status_code == 503, where
        assert response.headers["retry-after"] == "2", where  # 1.4 s rounded up
        assert response.json()["error"]["code"] == "overloaded", where
    assert refused["v1 API"].json()["error"]["type"] == "server_error"
    assert refused["sync view"].json()["error"]["status"] == 503
