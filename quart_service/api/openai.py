"""The OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``.

Every error under ``/v1`` has OpenAI's shape (rendered by :mod:`quart_service.errors`),
so the official clients raise their usual exceptions::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": "invalid_value"}}
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import Blueprint, Response, request

from ..context import engines, pool, snapshot
from ..data.models import ModelConfig
from ..engines.base import Embedder, Engine, GenerationRequest, Message
from ..errors import InvalidParameter, ModelNotFound
from ..streaming import sse
from .generation import Generation
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

__all__ = ["DEFAULT_MAX_TOKENS", "v1"]

v1 = Blueprint("v1", __name__, url_prefix="/v1")
DEFAULT_MAX_TOKENS = 256
M = TypeVar("M", bound=BaseModel)


async def _body(schema: type[M]) -> M:
    raw = await request.get_data(False, False, False)  # 413 past max_body_size
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidParameter(
            "The request body is not valid UTF-8.", code="invalid_body"
        ) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidParameter(
            f"The request body is not valid JSON: {exc}.", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InvalidParameter("The request body must be a JSON object.", code="invalid_body")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = f"Invalid value for '{param}': {first['msg']}." if param else first["msg"]
        raise InvalidParameter(message, param=param, code="invalid_value") from None


async def _model(name: str, param: str | None = "model") -> ModelConfig:
    model = (await snapshot()).models.get(name)
    if model is None or not model.enabled:
        raise ModelNotFound(f"The model '{name}' does not exist or is disabled.", param=param)
    return model


async def _engine(model: ModelConfig) -> Engine:
    # Admission: a generation's pool steps are never refused once it has started,
    # so refuse here (503 + Retry-After) while the pool and its queue are full.
    pool().check_capacity()
    registry = await engines().engines()
    return await registry.get(model)


def _model_object(model: ModelConfig) -> dict[str, Any]:
    """A model in OpenAI's shape."""
    return {"id": model.name, "object": "model", "created": 0, "owned_by": model.engine}


def _request(
    body: ChatCompletionRequest | CompletionRequest, prompt: str, **extra: Any
) -> GenerationRequest:
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens or DEFAULT_MAX_TOKENS
    return GenerationRequest(
        prompt=prompt,
        max_tokens=limit,
        temperature=float(body.temperature),
        top_p=float(body.top_p),
        seed=body.seed,
        stop=body.stop_sequences(),
        **extra,
    )


@v1.get("/models")
async def list_models() -> dict[str, Any]:
    """The enabled models."""
    models = (await snapshot()).models.values()
    return {"object": "list", "data": [_model_object(m) for m in models if m.enabled]}


@v1.get("/models/<path:model_id>")
async def retrieve_model(model_id: str) -> dict[str, Any]:
    """One enabled model (``client.models.retrieve(id)``)."""
    return _model_object(await _model(model_id, param=None))


@v1.post("/chat/completions")
async def chat_completions() -> Response | dict[str, Any]:
    """Chat completions, streamed as ``chat.completion.chunk`` events or answered whole."""
    body = await _body(ChatCompletionRequest)
    messages = tuple(Message(m.role, m.text()) for m in body.messages)
    prompt = "\n".join(m.content for m in messages)
    generation, head = await _start(body, _request(body, prompt, messages=messages), "chatcmpl")
    if body.stream:
        return _stream(generation, head, _wants_usage(body), _chat_chunk)
    text = "".join([piece async for piece in generation.pieces()])
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "finish_reason": generation.finish_reason}
    return {
        **head,
        "object": "chat.completion",
        "choices": [{**choice, "logprobs": None}],
        "usage": generation.usage(),
        "system_fingerprint": None,
    }


@v1.post("/completions")
async def completions() -> Response | dict[str, Any]:
    """Text completions, streamed or answered whole."""
    body = await _body(CompletionRequest)
    generation, head = await _start(body, _request(body, body.prompt_text()), "cmpl")
    if body.stream:
        return _stream(generation, head, _wants_usage(body), _text_chunk)
    text = "".join([piece async for piece in generation.pieces()])
    choice = {"index": 0, "text": text, "finish_reason": generation.finish_reason}
    return {
        **head,
        "object": "text_completion",
        "choices": [{**choice, "logprobs": None}],
        "usage": generation.usage(),
    }


@v1.post("/embeddings")
async def embeddings() -> dict[str, Any]:
    """Embeddings in OpenAI's shape, for one text or a list; ``encoding_format`` float
    or base64 (little-endian float32, what the official client asks for by default)."""
    body = await _body(EmbeddingRequest)
    model = await _model(body.model)
    engine = await _engine(model)
    if not isinstance(engine, Embedder):
        raise InvalidParameter(
            f"The model '{model.name}' (engine '{model.engine}') does not embed text.",
            param="model",
            code="embeddings_unsupported",
        )
    size = body.dimensions
    if size is not None and size > engine.dimensions:
        raise InvalidParameter(
            f"Invalid value for 'dimensions': the model's vectors have {engine.dimensions}.",
            param="dimensions",
            code="invalid_value",
        )
    texts = body.texts()
    vectors = await engine.embed(texts)
    tokens = sum(engine.count_tokens(text) for text in texts)
    encode = _base64 if body.encoding_format == "base64" else _floats
    data = [
        {"object": "embedding", "index": i, "embedding": encode(_shorten(vector, size))}
        for i, vector in enumerate(vectors)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model.name, "usage": usage}


def _shorten(vector: list[float], size: int | None) -> list[float]:
    """The first ``size`` components, scaled back to unit length (as OpenAI's
    ``dimensions`` does for its own models)."""
    if size is None or size >= len(vector):
        return vector
    head = vector[:size]
    norm = math.sqrt(math.fsum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


def _floats(vector: list[float]) -> list[float]:
    return vector


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def _start(
    body: ChatCompletionRequest | CompletionRequest, request: GenerationRequest, prefix: str
) -> tuple[Generation, dict[str, Any]]:
    """Resolve the model and its engine; the answer's common head."""
    model = await _model(body.model)
    engine = await _engine(model)
    counts = engines().counts
    counts.requests.inc()
    head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.name}
    return Generation(engine, request, counts), head


def _wants_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


_Chunk = Callable[[dict[str, Any], str | None, str | None, bool], dict[str, Any]]


def _chat_chunk(
    head: dict[str, Any], text: str | None, finish: str | None, first: bool
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {
        **head,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def _text_chunk(
    head: dict[str, Any], text: str | None, finish: str | None, first: bool
) -> dict[str, Any]:
    return {
        **head,
        "object": "text_completion",
        "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}],
    }


def _stream(generation: Generation, head: dict[str, Any], usage: bool, chunk: _Chunk) -> Response:
    engines().counts.streams.inc()

    async def events() -> AsyncIterator[Any]:
        yield chunk(head, "" if chunk is _chat_chunk else None, None, True)
        async for piece in generation.pieces():
            yield chunk(head, piece, None, False)
        yield chunk(head, None, generation.finish_reason, False)
        if usage:
            yield {**chunk(head, None, None, False), "choices": [], "usage": generation.usage()}
        yield "[DONE]"

    return sse(events())
