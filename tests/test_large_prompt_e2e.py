"""Issue 15, item 3: one large prompt does not hold the event loop of its worker.

A 1-worker Hypercorn (so ``/livez`` is served by the very worker that handles the
prompt) gets 10 MB prompts for the n-gram and the neural engine; ``/livez``, polled
the whole time on another connection, answers within 100 ms every time. Before,
tokenising the prompt on the event loop made it wait 1-3 s.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from quart_service.engines.neural.random_weights import write_random_weights
from quart_service.engines.neural.weights import GPT2Config

from .support.admin import create_model
from .support.data import wait_all
from .support.server import pinned_workers, running_server

TOKEN = "test-admin-token"
PROMPT = ("We the People of the United States, in Order to form a more perfect Union, " * 140_000)[
    : 10 * 1000 * 1000
]


def _poll(probe: httpx.Client, latencies: list[float], done: threading.Event) -> None:
    while not done.is_set():
        started = time.monotonic()
        assert probe.get("/livez").status_code == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.005)


def test_livez_stays_fast_while_a_10_mb_prompt_is_processed(tmp_path: Path) -> None:
    weights = tmp_path / "gpt.safetensors"
    write_random_weights(weights, GPT2Config(1, 2, 32, 260, 256), seed=1)
    env = {"QUART_SERVICE_ADMIN_TOKEN": TOKEN, "QUART_SERVICE_REFRESH_INTERVAL": "0.3"}
    with (
        running_server(tmp_path, workers=1, env=env) as server,
        pinned_workers(server, 1) as clients,
    ):
        create_model(server.url, TOKEN, "gpt", "neural", {"weights": str(weights)})
        wait_all(clients, "/data", lambda a: "gpt" in a["models"], timeout=10)
        (probe,) = clients.values()
        # Built once per worker on first use (importing numpy holds the GIL for a
        # while, once): not what this test is about.
        warm = {"model": "gpt", "prompt": "x", "max_tokens": 1}
        assert probe.post("/v1/completions", json=warm).status_code == 200
        bodies: dict[str, tuple[str, dict[str, Any]]] = {
            "chat, n-gram": ("/v1/chat/completions", {"model": "local-ngram",
                             "messages": [{"role": "user", "content": PROMPT}]}),
            "text, neural": ("/v1/completions", {"model": "gpt", "prompt": PROMPT}),
        }  # fmt: skip
        for label, (path, body) in bodies.items():
            content = json.dumps({**body, "max_tokens": 2}).encode()
            worst: list[float] = []
            # A stall the request causes comes back every time (before: 0.6-3 s each
            # time); a stall of a shared machine's scheduler does not. So: the worst
            # /livez of some attempt (of at most 3) under 100 ms.
            while len(worst) < 3 and (not worst or min(worst) >= 0.1):
                worst.append(_worst_livez(server.url, probe, path, content, label))
            assert min(worst) < 0.1, (label, worst)


def _worst_livez(url: str, probe: httpx.Client, path: str, content: bytes, label: str) -> float:
    """The slowest /livez on ``probe`` while ``content`` is posted to ``path``."""
    probe.get("/livez")  # the probe's connection is open and warm
    latencies: list[float] = []
    done = threading.Event()
    poller = threading.Thread(target=_poll, args=(probe, latencies, done))
    poller.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as big:
            answer = big.post(path, content=content, headers={"Content-Type": "application/json"})
    finally:
        done.set()
        poller.join()
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] > 1_000_000, label
    assert len(latencies) >= 3, label  # the prompt took a while: /livez ran meanwhile
    return max(latencies)
