"""``/metrics`` sums every worker; request ids and JSON access logs; on real Hypercorn."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import running_server

APP = "quart_service.app:app"


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_after_a_known_sequence_show_exact_counts_summed_over_workers(
    tmp_path: Path,
) -> None:
    env = {"QUART_SERVICE_ACCESS_LOG": "0"}
    with running_server(tmp_path, app=APP, workers=3, env=env) as server:
        # The start-up check made requests: count from a first scrape on, once every
        # worker moved its request tallies to the shared files (every 0.25 s).
        time.sleep(0.35)
        baseline = _samples(httpx.get(server.url + "/metrics").text)
        pids: set[int] = set()
        # A new connection per request, so the requests spread over the workers.
        close = {"Connection": "close"}
        for _ in range(30):
            pids.add(httpx.get(server.url + "/livez", headers=close).json()["pid"])
        for _ in range(7):
            assert httpx.get(server.url + "/no/such/page", headers=close).status_code == 404
        for _ in range(5):
            response = httpx.post(server.url + "/v1/chat/completions", json={}, headers=close)
            assert response.status_code == 400
        for _ in range(4):
            response = httpx.get(server.url + "/demo/stream?count=5&interval=0", headers=close)
            assert response.text.count("data: ") == 5
        assert len(pids) >= 2, "the requests reached several workers"
        time.sleep(0.35)  # request and stream counts reach the files at the next tick
        text = httpx.get(server.url + "/metrics").text
    final = _samples(text)
    samples = {key: value - baseline.get(key, 0.0) for key, value in final.items()}
    gauges = final
    requests = "quart_service_http_requests_total"
    assert _value(samples, requests, route="/livez", method="GET", status="200") == 30
    assert _value(samples, requests, route="<unmatched>", method="GET", status="404") == 7
    assert _value(samples, requests, route="/v1/chat/completions", method="POST", status="400") == 5
    assert _value(samples, requests, route="/demo/stream", method="GET", status="200") == 4
    assert (
        _value(samples, "quart_service_http_request_duration_seconds_count", route="/livez") == 30
    )
    assert (
        _value(samples, "quart_service_http_time_to_first_byte_seconds_count", route="/demo/stream")
        == 4
    )
    assert _value(samples, "quart_service_streams_opened_total") == 4
    assert _value(samples, "quart_service_stream_events_total") == 20
    assert _value(samples, "quart_service_stream_ends_total", reason="completed") == 4
    assert _value(gauges, "quart_service_streams_active") == 0
    # Gauges combine as documented: one leader per host, every worker's pool counted.
    assert _value(gauges, "quart_service_leader") == 1
    assert _value(gauges, "quart_service_executor_threads") == 3 * 16
    assert _value(gauges, "quart_service_resource_state", resource="snapshot", state="ready") == 3
    assert _value(gauges, "quart_service_snapshot_published_generation") >= 1
    assert _value(gauges, "quart_service_database_queries_total", kind="load") >= 1
    worker_series = [key for key in samples if key[0] == "quart_service_worker_threads"]
    assert len(worker_series) == 3  # one per live worker (pid label)


def test_request_ids_are_kept_or_added_and_each_request_logs_one_json_line(
    tmp_path: Path,
) -> None:
    env = {"QUART_SERVICE_LOG_FORMAT": "json"}
    with running_server(tmp_path, app=APP, workers=2, env=env) as server:
        given = httpx.get(server.url + "/v1/models", headers={"X-Request-ID": "req-42.a"})
        assert given.headers["x-request-id"] == "req-42.a"
        fresh = httpx.get(server.url + "/livez")
        generated = fresh.headers["x-request-id"]
        assert len(generated) == 32
        forged = httpx.get(server.url + "/livez", headers={"X-Request-ID": 'x" level=ERROR'})
        assert forged.headers["x-request-id"] not in ('x" level=ERROR', generated)
        missing = httpx.get(server.url + "/nope", headers={"X-Request-ID": "lost-1"})
        assert missing.status_code == 404
        assert missing.headers["x-request-id"] == "lost-1"
        # A stream's bytes are counted by its own loop after the first chunk.
        streamed = httpx.get(
            server.url + "/demo/stream?count=30&interval=0.01", headers={"X-Request-ID": "sse-1"}
        )
        assert streamed.text.count("data: ") == 30
        # A line is written when its response has gone out, and each worker writes its
        # lines in batches within 0.1 s: wait for every request's line.
        ids = ["req-42.a", generated, forged.headers["x-request-id"], "lost-1", "sse-1"]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if all(f'"request_id": "{i}"' in server.log() for i in ids):
                break
            time.sleep(0.05)
        log = server.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = {
        line["request_id"]: line for line in lines if line["logger"] == "quart_service.access"
    }
    models = access["req-42.a"]
    assert models["method"] == "GET"
    assert models["path"] == "/v1/models"
    assert models["status"] == 200
    assert models["bytes"] == len(given.content)
    assert models["duration_ms"] > 0
    assert access[generated]["path"] == "/livez"
    assert access["lost-1"]["status"] == 404
    assert access["sse-1"]["bytes"] == len(streamed.content) > 0
    # Every line of the service is JSON, with its level and process.
    assert all({"time", "level", "process", "message"} <= set(line) for line in lines)


def test_completion_tokens_counter_equals_the_usage_the_clients_were_told(
    tmp_path: Path,
) -> None:
    with running_server(tmp_path, app=APP, workers=2) as server:
        before = _samples(httpx.get(server.url + "/metrics").text)
        close = {"Connection": "close"}  # spread the requests over both workers
        told = 0
        for max_tokens in (5, 8, 13):
            chat = {
                "model": "local-ngram",
                "messages": [{"role": "user", "content": "We the People"}],
                "max_tokens": max_tokens,
            }
            answer = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=close)
            told += answer.json()["usage"]["completion_tokens"]
            text = {"model": "local-ngram", "prompt": "Four score", "max_tokens": max_tokens}
            answer = httpx.post(server.url + "/v1/completions", json=text, headers=close)
            told += answer.json()["usage"]["completion_tokens"]
            streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
            answer = httpx.post(server.url + "/v1/chat/completions", json=streamed, headers=close)
            events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
            usage = json.loads(events[-2])["usage"]  # the last chunk before [DONE]
            told += usage["completion_tokens"]
        after = _samples(httpx.get(server.url + "/metrics").text)
    name = "quart_service_ai_completion_tokens_total"
    assert told == 3 * (5 + 8 + 13)  # the n-gram model always fills max_tokens
    assert _value(after, name) - _value(before, name) == told
