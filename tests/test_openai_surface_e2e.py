"""Issue 15: the OpenAI surface, with the official client, against one real 2-worker
Hypercorn and a small real OpenAI-compatible server (tests/support/fake_openai.py)
as the upstream of the ``upstream`` engine's models.

Covered: ``models.retrieve``; ``n=2`` whole and streamed; ``logprobs`` and
``top_logprobs`` from the n-gram and neural engines; ``echo``, ``logprobs`` and prompt
lists on ``/v1/completions``; embeddings; fields an engine cannot honour refused with
``BadRequestError`` naming them, and relayed unchanged by the ``upstream`` engine;
the upstream's 429 relayed whole and streamed; a stream the upstream breaks ends with
an OpenAI error event and no traceback; API keys on ``/v1`` only.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from quart_service.engines.neural.random_weights import write_random_weights
from quart_service.engines.neural.weights import GPT2Config

from .support.admin import create_model
from .support.data import wait_all
from .support.server import ROOT, Server, free_port, pinned_workers, running_server, wait_for

TOKEN = "test-admin-token"
KEY = "sk-test-key"
SMALL = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=260, n_ctx=256)
CHAT: Any = [{"role": "user", "content": "We the People of the United States"}]


@contextlib.contextmanager
def _fake_upstream(tmp: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp / "fake-openai.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_openai", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(url + "/last", timeout=1).status_code == 200
            return False

        wait_for(up, "the fake upstream serves")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """The service (API keys on, models of every engine) and the fake upstream's URL."""
    tmp = tmp_path_factory.mktemp("openai")
    weights = tmp / "gpt.safetensors"
    write_random_weights(weights, SMALL, seed=3)
    env = {
        "QUART_SERVICE_DATA_DIR": str(tmp / "data"),
        "QUART_SERVICE_REFRESH_INTERVAL": "0.3",
        "QUART_SERVICE_ADMIN_TOKEN": TOKEN,
        "QUART_SERVICE_API_KEYS": f"sk-other,{KEY}",
    }
    with (
        _fake_upstream(tmp) as upstream,
        running_server(tmp, workers=2, env=env) as server,
        pinned_workers(server, 2) as clients,
    ):
        down = f"http://127.0.0.1:{free_port()}/v1"
        models: dict[str, tuple[str, dict[str, Any]]] = {
            "gpt": ("neural", {"weights": str(weights)}),
            "up": ("upstream", {"base_url": upstream + "/v1", "model": "ok"}),
            "up-limited": ("upstream", {"base_url": upstream + "/v1", "model": "limited"}),
            "up-breaks": ("upstream", {"base_url": upstream + "/v1", "model": "breaks"}),
            "up-down": ("upstream", {"base_url": down}),
        }
        for name, (engine, parameters) in models.items():
            create_model(server.url, TOKEN, name, engine, parameters)
        wait_all(clients, "/data", lambda a: set(models) <= set(a["models"]), timeout=10)
        yield server, upstream


@pytest.fixture
def client(served: tuple[Server, str]) -> Iterator[OpenAI]:
    with OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def test_models_retrieve(client: OpenAI) -> None:
    model = client.models.retrieve("local-ngram")
    assert (model.id, model.owned_by) == ("local-ngram", "local")
    assert client.models.retrieve("gpt").owned_by == "neural"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_n_choices_whole_and_streamed(client: OpenAI) -> None:
    whole = client.chat.completions.create(
        model="local-ngram", messages=CHAT, n=2, max_tokens=12, seed=4
    )
    assert [c.index for c in whole.choices] == [0, 1]
    texts = [c.message.content or "" for c in whole.choices]
    assert texts[0] != texts[1]  # each choice its own seed
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 24
    streamed: dict[int, str] = {0: "", 1: ""}
    finished: dict[int, str | None] = {}
    for chunk in client.chat.completions.create(
        model="local-ngram", messages=CHAT, n=2, max_tokens=12, seed=4, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert [streamed[0], streamed[1]] == texts
    assert finished == {0: "length", 1: "length"}


@pytest.mark.parametrize("model", ["local-ngram", "gpt"])
def test_chat_logprobs_in_the_shape_the_client_parses(client: OpenAI, model: str) -> None:
    answer = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == 8
    for entry in entries:
        assert entry.logprob <= 0
        assert 1 <= len(entry.top_logprobs) <= 3
        # Greedy: the token written is the likeliest one.
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob)
        assert entry.bytes is not None
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
    if model == "local-ngram":
        assert "".join(e.token for e in entries) == choice.message.content
    # Streamed: each chunk carries the entries of its own text.
    streamed = [
        entry
        for chunk in client.chat.completions.create(
            model=model,
            messages=CHAT,
            max_tokens=8,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            stream=True,
        )
        for c in chunk.choices
        if c.logprobs is not None and c.logprobs.content
        for entry in c.logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_completions_echo_logprobs_and_prompt_lists(client: OpenAI) -> None:
    prompts = ["Four score and seven", "We hold these truths"]
    answer = client.completions.create(
        model="local-ngram", prompt=prompts, n=2, max_tokens=6, seed=1, echo=True
    )
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    for choice in answer.choices:
        assert choice.text.startswith(prompts[choice.index // 2])
    scored = client.completions.create(
        model="local-ngram", prompt="Four score and seven", max_tokens=6, seed=1, logprobs=2
    )
    logprobs = scored.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens is not None
    assert "".join(logprobs.tokens) == scored.choices[0].text
    assert logprobs.text_offset is not None
    assert logprobs.text_offset[0] == 0
    assert logprobs.top_logprobs is not None
    tops = zip(logprobs.tokens, logprobs.top_logprobs, strict=True)
    assert all(token in top for token, top in tops)
    with pytest.raises(openai.BadRequestError) as both:
        client.completions.create(
            model="local-ngram", prompt="x", max_tokens=2, echo=True, logprobs=1
        )
    assert both.value.body["param"] == "echo"  # type: ignore[index]


def test_embeddings_of_the_neural_engine(client: OpenAI) -> None:
    answer = client.embeddings.create(model="gpt", input=["one", "two"])
    assert [len(d.embedding) for d in answer.data] == [SMALL.n_embd] * 2
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="local-ngram", input="one")
    assert refused.value.code == "embeddings_unsupported"


TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": TOOLS, "tool_choice": "required"}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"extra_body": {"top_k": 5}}, "top_k"),
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
         "messages.0.content.1"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("model", ["local-ngram", "gpt"])
def test_what_an_engine_cannot_honour_is_refused_naming_it(
    client: OpenAI, model: str, fields: dict[str, Any], param: str
) -> None:
    body = {"model": model, "messages": CHAT, "max_tokens": 3, **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**body)
    assert refused.value.body["param"] == param  # type: ignore[index]
    assert refused.value.code == "unsupported_parameter"
    # What leaves the text as it is is accepted: neutral values, and no-op fields.
    neutral: Any = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"},
               "user": "u-1", "metadata": {"a": "b"}, "store": False,
               "stream_options": {"include_usage": True}, "stream": True}  # fmt: skip
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=3,
                                                 **neutral))  # fmt: skip
    assert chunks[-1].usage is not None


def test_the_upstream_engine_relays_every_field_and_the_answer(
    client: OpenAI, served: tuple[Server, str]
) -> None:
    upstream = served[1]
    answer = client.chat.completions.create(
        model="up",
        messages=CHAT,
        tools=TOOLS,
        tool_choice="required",
        response_format={"type": "json_object"},
        logprobs=True,
        extra_body={"top_k": 5, "repetition_penalty": 1.1},
    )
    call = answer.choices[0].message.tool_calls
    assert call is not None
    assert call[0].function.name == "weather"  # type: ignore[union-attr]
    assert answer.choices[0].finish_reason == "tool_calls"
    received = httpx.get(upstream + "/last").json()
    assert received["model"] == "ok"  # the upstream's name for it
    assert received["tools"] == TOOLS
    assert received["tool_choice"] == "required"
    assert received["response_format"] == {"type": "json_object"}
    assert (received["logprobs"], received["top_k"], received["repetition_penalty"]) == (
        True,
        5,
        1.1,
    )
    assert "max_tokens" not in received  # nothing added that the client did not send
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="up", messages=CHAT, stream=True)
        if c.choices
    )
    assert text == "relayed"
    embedded = client.embeddings.create(model="up", input="x", encoding_format="float")
    assert embedded.data[0].embedding == [0.6, 0.8]


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_429_is_relayed_as_429(client: OpenAI, stream: bool) -> None:
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="up-limited", messages=CHAT, stream=stream)
    assert limited.value.status_code == 429
    assert limited.value.code == "rate_limit_exceeded"
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_streams_show_upstream_errors_in_openai_shape(
    client: OpenAI, served: tuple[Server, str]
) -> None:
    server = served[0]
    # Down before the first chunk: a plain 502, as for a whole answer.
    with pytest.raises(openai.APIStatusError) as down:
        client.chat.completions.create(model="up-down", messages=CHAT, stream=True)
    assert down.value.status_code == 502
    assert down.value.code == "engine_error"
    # Gone mid-stream: an error event the client raises, then the end of the stream.
    got: list[str] = []

    def read() -> None:
        for chunk in client.chat.completions.create(model="up-breaks", messages=CHAT, stream=True):
            got.append(chunk.choices[0].delta.role or "")

    with pytest.raises(openai.APIError) as broken:
        read()
    assert got == ["assistant"]
    assert "the upstream's stream failed" in broken.value.message
    log = server.log()
    assert "a relayed stream failed" in log
    assert "Traceback" not in log


def test_api_keys_guard_v1_only(served: tuple[Server, str]) -> None:
    server = served[0]
    with (
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as anonymous,
        pytest.raises(openai.AuthenticationError) as refused,
    ):
        anonymous.models.list()
    assert refused.value.code == "invalid_api_key"
    bare = httpx.post(server.url + "/v1/chat/completions", json={})
    assert bare.status_code == 401
    assert bare.json()["error"]["type"] == "invalid_request_error"
    with OpenAI(base_url=server.url + "/v1", api_key="sk-other", max_retries=0) as other:
        assert other.models.retrieve("local-ngram").id == "local-ngram"
    for path in ("/livez", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 200, path
