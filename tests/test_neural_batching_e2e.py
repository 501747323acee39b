"""Streams of the neural engine share decoding steps in real Hypercorn workers.

Issue 14: 32 concurrent streams at temperature 0 get exactly the tokens each gets
alone; 8 of them disconnect mid-stream and leave the batch, the others finish, and
no pool thread is left computing for nobody. ``/v1/embeddings`` through the official
``openai`` client, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from quart_service.engines.neural.random_weights import write_random_weights
from quart_service.engines.neural.weights import GPT2Config

from .support.admin import create_model
from .support.data import wait_all
from .support.server import Server, pinned_workers, running_server, wait_for

pytestmark = pytest.mark.slow

TOKEN = "test-admin-token"
SMALL = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=260, n_ctx=4096)
STREAMS = 32
LEAVERS = 8  # disconnect after a few chunks
FINISH = 40  # tokens of the streams that finish
# Tokens the leavers asked for: far more than they read, and more than this small
# model makes before a leaver is gone. With 400 (a model that steps in a millisecond)
# a loaded client could still be reading its fifth chunk when the server, whose writes
# the socket buffer absorbed, had finished the whole generation.
LONG = 4000
FEW = 100  # steps a leaver's state may take before its leaving is noticed


def _prompt(n: int) -> str:
    return f"Stream {n}: we the people"


def _body(n: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": "gpt",
        "prompt": _prompt(n),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


async def _stream(client: httpx.AsyncClient, n: int, leave_after: int | None) -> str:
    """The text a client receives; a leaver closes the connection after some chunks."""
    text, chunks = "", 0
    body = _body(n, LONG if leave_after is not None else FINISH, True)
    async with client.stream("POST", "/v1/completions", json=body) as answer:
        assert answer.status_code == 200
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"] or ""
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return text  # leaving the block closes this connection
    return text


async def _all_streams(url: str) -> list[str]:
    limits = httpx.Limits(max_connections=STREAMS)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(_stream(client, n, 5 if n < LEAVERS else None) for n in range(STREAMS))
        )


@contextlib.contextmanager
def _serving(tmp_path: Path, seed: int) -> Iterator[tuple[Server, dict[int, httpx.Client]]]:
    """2 workers serving model "gpt": a small random GPT-2; a client pinned to each."""
    weights = tmp_path / "small.safetensors"
    write_random_weights(weights, SMALL, seed=seed)
    env = {
        "QUART_SERVICE_DATA_DIR": str(tmp_path / "data"),
        "QUART_SERVICE_REFRESH_INTERVAL": "0.5",
        "QUART_SERVICE_ADMIN_TOKEN": TOKEN,
        "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
    }
    with (
        running_server(tmp_path, workers=2, env=env) as server,
        pinned_workers(server, 2) as clients,
    ):
        create_model(server.url, TOKEN, "gpt", "neural", {"weights": str(weights)})
        wait_all(clients, "/data", lambda a: "gpt" in a["models"], timeout=10)
        yield server, clients


def _engine_stats(client: httpx.Client) -> dict[str, Any]:
    engines = client.get("/debug/identity").json()["ai"]["engines"]
    row = next(e for e in engines if e["model"] == "gpt")
    stats: dict[str, Any] = row["stats"]
    return stats


def test_batched_streams_equal_their_lone_runs_and_leavers_free_their_slots(
    tmp_path: Path,
) -> None:
    with _serving(tmp_path, seed=3) as (server, clients):
        for client in clients.values():  # each worker builds its engine
            assert client.post("/v1/completions", json=_body(0, 1, False)).status_code == 200
        # Alone: one request at a time, answered whole.
        alone = []
        for n in range(STREAMS):
            answer = httpx.post(server.url + "/v1/completions", json=_body(n, FINISH, False))
            assert answer.status_code == 200, answer.text
            alone.append(answer.json()["choices"][0]["text"])
        assert len(set(alone)) > 1  # the prompts lead to different texts

        before = sum(_engine_stats(c)["steps"]["stepped"] for c in clients.values())
        together = asyncio.run(_all_streams(server.url))

        for n in range(LEAVERS, STREAMS):
            assert together[n] == alone[n], n  # the same tokens, batched or alone
        for n in range(LEAVERS):
            assert together[n], n  # it got some text before it left
            assert alone[n].startswith(together[n]), n

        def idle() -> bool:
            for client in clients.values():
                steps = _engine_stats(client)["steps"]
                pool = client.get("/debug/identity").json()["executor"]
                if steps["active"] or steps["waiting"] or steps["running"] or pool["active"]:
                    return False
            return True

        # The leavers left the batch (their 4,000 tokens were never computed), and no
        # thread computes for anybody once the streams are over.
        wait_for(idle, "no stream in a batch and no busy pool thread", 5)
        stats = [_engine_stats(c)["steps"] for c in clients.values()]
        assert sum(s["left_early"] for s in stats) == LEAVERS
        assert max(s["largest_batch"] for s in stats) > 1  # streams did share steps
        # The leavers' states were stepped a few times, not the 4,000 they asked for.
        leavers_steps = sum(s["stepped"] for s in stats) - before - (STREAMS - LEAVERS) * FINISH
        assert 0 < leavers_steps < LEAVERS * FEW
        time.sleep(0.5)
        assert idle()


def test_embeddings_through_the_official_client(tmp_path: Path) -> None:
    with (
        _serving(tmp_path, seed=4) as (server, _),
        OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        # The client asks for base64 by default and decodes it into floats itself.
        one = client.embeddings.create(model="gpt", input="We the People")
        assert len(one.data) == 1
        assert len(one.data[0].embedding) == SMALL.n_embd
        assert abs(sum(x * x for x in one.data[0].embedding) - 1.0) < 1e-4
        assert one.usage.prompt_tokens == len(b"We the People")
        texts = ["of the United States", "We the People", "in Order to form"]
        many = client.embeddings.create(model="gpt", input=texts, encoding_format="float")
        assert [d.index for d in many.data] == [0, 1, 2]
        again = many.data[1].embedding
        assert max(abs(a - b) for a, b in zip(again, one.data[0].embedding, strict=True)) < 1e-5
        short = client.embeddings.create(model="gpt", input="We the People", dimensions=16)
        assert len(short.data[0].embedding) == 16
        answer = httpx.post(
            server.url + "/v1/embeddings",
            json={"model": "gpt", "input": "x", "dimensions": SMALL.n_embd + 1},
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "dimensions"
