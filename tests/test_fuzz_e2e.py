"""Fuzz the HTTP API of a real 2-worker server with hypothesis (bounded, seeded).

Bodies are built from the shapes in ``/openapi.json`` (the chat and completion
requests) with every field also allowed to be any JSON value, plus raw bytes, odd
paths, methods, query strings and headers. Whatever comes in: no 5xx other than the
documented 503, every error is the JSON error body, no traceback is logged, and no
worker dies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.server import Server, running_server

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same cases in every CI run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)


def _or_anything(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy | json_values


messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": _or_anything(st.sampled_from(["system", "user", "assistant", "tool", "x"])),
            "content": _or_anything(
                st.text(max_size=200)
                | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()}))
            ),
            "name": json_values,
        },
    ),
    max_size=4,
)
sampling: dict[str, st.SearchStrategy[Any]] = {
    "model": _or_anything(st.sampled_from(["local-ngram", "", "nope", "x" * 300])),
    "max_tokens": _or_anything(st.integers(-5, 40)),
    "temperature": st.floats(allow_nan=True, allow_infinity=True) | json_values,
    "top_p": st.floats(allow_nan=True, allow_infinity=True) | json_values,
    "seed": _or_anything(st.integers(-(2**70), 2**70)),
    "stop": _or_anything(st.lists(st.text(max_size=5), max_size=6)),
    "stream": _or_anything(st.booleans()),
    "stream_options": _or_anything(st.fixed_dictionaries({"include_usage": json_values})),
    "n": _or_anything(st.integers(-1, 3)),
}
chat_bodies = st.fixed_dictionaries({}, optional={**sampling, "messages": _or_anything(messages)})
completion_bodies = st.fixed_dictionaries(
    {}, optional={**sampling, "prompt": _or_anything(st.text(max_size=200) | st.lists(st.text()))}
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp_path: Path = tmp_path_factory.mktemp("fuzz")
    env = {"QUART_SERVICE_ACCESS_LOG": "0", "QUART_SERVICE_ADMIN_TOKEN": "fuzz-token"}
    with running_server(tmp_path, app="quart_service.app:app", env=env) as running:
        running.pids_at_start = running.worker_pids()  # type: ignore[attr-defined]
        yield running
    assert "Traceback" not in running.log()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _check(client: httpx.Client, method: str, path: str, **kwargs: Any) -> int:
    """Send one request; the status, once its error body (if any) was checked."""
    with client.stream(method, path, **kwargs) as response:
        # A stream that started is a 200 by now; read only a little of it.
        head = b""
        for chunk in response.iter_bytes():
            head += chunk
            if len(head) > 65536:
                break
    status = response.status_code
    if status >= 400 and method != "HEAD":
        error = json.loads(head)["error"]
        assert isinstance(error["code"], str), head[:500]
        assert isinstance(error["message"], str), head[:500]
    return status


def _handled(status: int) -> bool:
    """No 5xx but the documented 503 (overload, database busy)."""
    return status < 500 or status == 503


@FUZZ
@given(body=chat_bodies)
def test_chat_completions(client: httpx.Client, body: dict[str, Any]) -> None:
    assert _handled(_check(client, "POST", "/v1/chat/completions", content=json.dumps(body)))


@FUZZ
@given(body=completion_bodies)
def test_completions(client: httpx.Client, body: dict[str, Any]) -> None:
    assert _handled(_check(client, "POST", "/v1/completions", content=json.dumps(body)))


@FUZZ
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/admin/models"]),
    body=st.binary(max_size=300),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "application/json; charset=latin-1", ""]
    ),
)
def test_raw_bodies(client: httpx.Client, path: str, body: bytes, content_type: str) -> None:
    headers = {"Content-Type": content_type, "Authorization": "Bearer fuzz-token"}
    assert _handled(_check(client, "POST", path, content=body, headers=headers))


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
    prefix=st.sampled_from(["/", "/v1/", "/admin/models/", "/demo/", "/debug/", "/metrics/"]),
    tail=st.text(st.characters(codec="utf-8", exclude_characters="?#"), max_size=40),
    query=st.dictionaries(
        st.sampled_from(["count", "interval", "format", "source", "x"]),
        st.text(max_size=12) | st.integers(-5, 5).map(str),
        max_size=4,
    ),
    # Any bytes a client can put in a header value: visible ASCII, space, tab, Latin-1.
    request_id=st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
        | st.just("\t"),
        max_size=200,
    ),
)
def test_paths_methods_queries_and_headers(
    client: httpx.Client,
    method: str,
    prefix: str,
    tail: str,
    query: dict[str, str],
    request_id: str,
) -> None:
    headers = {"X-Request-ID": request_id.strip(" \t").encode("latin-1")}
    # Percent-encoded as a client would; a leading "//" would name a host instead.
    path = prefix + quote(tail.lstrip("/"), safe="/")
    if "count" not in query:
        query["count"] = "3"  # keep demo streams short
    query.setdefault("interval", "0")
    assert _handled(_check(client, method, path, params=query, headers=headers))


def test_no_worker_died(server: Server, client: httpx.Client) -> None:
    """Runs after the fuzz tests of this module (file order)."""
    assert server.process.poll() is None
    assert server.worker_pids() == server.pids_at_start  # type: ignore[attr-defined]
    assert client.get("/livez").status_code == 200
