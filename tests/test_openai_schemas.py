"""Issue 15, items 1 and 5 (the /v1 request schemas): the JSON schemas that
/openapi.json publishes refuse what the handlers refuse, and accept what OpenAI's
clients send (``user``, ``stream_options``, ``seed``, ``tools`` for an upstream)."""

from __future__ import annotations

from typing import Any

import jsonschema
from quart.typing import TestAppProtocol as RunningApp

USER = [{"role": "user", "content": "We the People"}]
CHAT = {"model": "local-ngram", "messages": USER, "max_tokens": 3}
TEXT = {"model": "local-ngram", "prompt": "We the People", "max_tokens": 3}
EMBED = {"model": "local-ngram", "input": "x"}

# (operation, body, the param the handler names)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("chat", {**CHAT, "n": 0}, "n"),
    ("chat", {**CHAT, "n": 17}, "n"),
    ("chat", {**CHAT, "n": "2"}, "n"),
    ("chat", {**CHAT, "logprobs": "yes"}, "logprobs"),
    ("chat", {**CHAT, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("chat", {**CHAT, "max_completion_tokens": 40_000}, "max_completion_tokens"),
    ("chat", {**CHAT, "temperature": 2.5}, "temperature"),
    ("chat", {**CHAT, "top_p": 0}, "top_p"),
    ("chat", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {**CHAT, "stream": "true"}, "stream"),
    ("chat", {**CHAT, "seed": 1.5}, "seed"),
    ("chat", {**CHAT, "frequency_penalty": 3}, "frequency_penalty"),
    ("chat", {**CHAT, "logit_bias": {"50256": 101}}, "logit_bias.50256"),
    ("chat", {**CHAT, "tools": {"type": "function"}}, "tools"),
    ("chat", {**CHAT, "response_format": {"type": "yaml"}}, "response_format.type"),
    ("chat", {**CHAT, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ("chat", {**CHAT, "messages": []}, "messages"),
    ("chat", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("chat", {**CHAT, "messages": [{"content": "x"}]}, "messages.0.role"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
     "messages.0.content.0.text"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "messages.0.content.0"),
    ("chat", {"messages": USER}, "model"),
    ("chat", {**CHAT, "model": ""}, "model"),
    ("text", {**TEXT, "prompt": []}, "prompt"),
    ("text", {**TEXT, "prompt": [1, 2, 3]}, "prompt.0"),
    ("text", {**TEXT, "logprobs": 6}, "logprobs"),
    ("text", {**TEXT, "logprobs": True}, "logprobs"),
    ("text", {**TEXT, "echo": "yes"}, "echo"),
    ("text", {**TEXT, "best_of": 0}, "best_of"),
    ("text", {"model": "local-ngram"}, "prompt"),
    ("embed", {**EMBED, "input": []}, "input"),
    ("embed", {**EMBED, "input": [""]}, "input"),
    ("embed", {**EMBED, "input": [[1, 2]]}, "input"),
    ("embed", {**EMBED, "encoding_format": "int8"}, "encoding_format"),
    ("embed", {**EMBED, "dimensions": 0}, "dimensions"),
]  # fmt: skip

ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("chat", {**CHAT, "user": "u-1", "seed": 3, "stream_options": {"include_usage": True},
              "stream": False, "n": 2, "logprobs": True, "top_logprobs": 2,
              "temperature": None, "metadata": {"k": "v"}, "store": False}),
    ("chat", {**CHAT, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
              "messages": [{"role": "system", "content": "be brief"},
                           {"role": "user", "name": "ann",
                            "content": [{"type": "text", "text": "hello"}]}]}),
    ("text", {**TEXT, "prompt": ["a b", "c d"], "n": 2, "echo": True, "best_of": 2,
              "user": "u-1", "stop": "."}),
    ("text", {**TEXT, "logprobs": 0, "seed": 1, "temperature": 1, "top_p": 0.5}),
    ("embed", {**EMBED, "input": ["a", "b"], "encoding_format": "base64", "user": "u"}),
]  # fmt: skip

PATHS = {"chat": "/v1/chat/completions", "text": "/v1/completions", "embed": "/v1/embeddings"}
SCHEMAS = {
    "chat": "ChatCompletionRequest",
    "text": "CompletionRequest",
    "embed": "EmbeddingRequest",
}


async def _document(app: RunningApp) -> dict[str, Any]:
    """The document the app publishes (built from the routes it mounts)."""
    answer = await app.test_client().get("/openapi.json")
    assert answer.status_code == 200
    doc: dict[str, Any] = await answer.get_json()
    return doc


def _schema_accepts(doc: dict[str, Any], operation: str, body: dict[str, Any]) -> bool:
    schema = {"$ref": f"#/components/schemas/{SCHEMAS[operation]}", **doc}
    validator = jsonschema.Draft202012Validator(schema)
    return bool(validator.is_valid(body))


async def test_the_published_schema_refuses_what_the_handler_refuses(
    test_app: RunningApp,
) -> None:
    client = test_app.test_client()  # one app for every case: each start costs
    doc = await _document(test_app)
    for operation, body, param in REFUSED:
        answer = await client.post(PATHS[operation], json=body)
        assert answer.status_code == 400, (body, await answer.get_data())
        error = (await answer.get_json())["error"]
        assert (error["param"], error["code"]) == (param, "invalid_value"), body
        assert not _schema_accepts(doc, operation, body), body


async def test_what_openai_clients_send_is_accepted_by_both(test_app: RunningApp) -> None:
    client = test_app.test_client()
    doc = await _document(test_app)
    for operation, body in ACCEPTED:
        answer = await client.post(PATHS[operation], json=body)
        if operation == "embed":  # valid, for a model that embeds (local-ngram does not)
            assert (await answer.get_json())["error"]["code"] == "embeddings_unsupported"
        else:
            assert answer.status_code == 200, (body, await answer.get_data())
        assert _schema_accepts(doc, operation, body), body


async def test_fields_the_engine_cannot_honour_are_well_formed_but_refused(
    test_app: RunningApp,
) -> None:
    """``tools`` and a field unknown to OpenAI are valid for the schema (the upstream
    engine relays them) and refused, naming them, by a local engine (documented)."""
    tools = [{"type": "function", "function": {"name": "f"}}]
    doc = await _document(test_app)
    for body, param in (({**CHAT, "tools": tools}, "tools"), ({**CHAT, "top_k": 5}, "top_k")):
        assert _schema_accepts(doc, "chat", body)
        answer = await test_app.test_client().post(PATHS["chat"], json=body)
        assert answer.status_code == 400
        error = (await answer.get_json())["error"]
        assert (error["param"], error["code"]) == (param, "unsupported_parameter")
