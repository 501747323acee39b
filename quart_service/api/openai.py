"""The OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Errors have OpenAI's shape, so the official clients raise their usual exceptions::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": "invalid_value"}}
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import Blueprint, Response, request
from werkzeug.exceptions import HTTPException

from ..data.snapshot import ModelConfig
from ..engines.base import Engine, GenerationRequest, Message
from ..engines.registry import EngineRegistry
from ..errors import ServiceError
from ..service import current_service, snapshot
from ..streaming import sse
from .generation import AICounters, Generation
from .schemas import ChatCompletionRequest, CompletionRequest
from .wiring import ENGINES

__all__ = ["AI_COUNTERS", "OpenAIError", "v1"]

log = logging.getLogger("quart_service.api")

v1 = Blueprint("v1", __name__, url_prefix="/v1")
AI_COUNTERS = AICounters()  # per process: each worker imports its own module
DEFAULT_MAX_TOKENS = 256
M = TypeVar("M", bound=BaseModel)


class OpenAIError(ServiceError):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status, self.type, self.param, self.error_code = status, type, param, code


def _error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None,
    code: str | None,
    retry_after: float | None = None,
) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    response = Response(json.dumps(body), status=status, content_type="application/json")
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(retry_after)))
    return response


@v1.errorhandler(Exception)
async def _any_error(exc: Exception) -> Response:
    if isinstance(exc, OpenAIError):
        return _error_response(exc.http_status, exc.message, exc.type, exc.param, exc.error_code)
    if isinstance(exc, ServiceError):
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        return _error_response(
            exc.status, exc.message, kind, None, exc.code, retry_after=exc.retry_after
        )
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        code = "request_too_large" if status == 413 else None
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return _error_response(status, exc.description or exc.name, kind, None, code)
    log.exception("unhandled error in the v1 API")
    return _error_response(
        500, "The server failed; the error was logged.", "server_error", None, None
    )


async def _body(schema: type[M]) -> M:
    raw = await request.get_data(False, False, False)  # 413 past max_body_size
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OpenAIError(
            400, "The request body is not valid UTF-8.", code="invalid_body"
        ) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise OpenAIError(
            400, f"The request body is not valid JSON: {exc}.", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_body")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = f"Invalid value for '{param}': {first['msg']}." if param else first["msg"]
        raise OpenAIError(400, message, param=param, code="invalid_value") from None


async def _model(name: str) -> ModelConfig:
    model = (await snapshot()).models.get(name)
    if model is None or not model.enabled:
        raise OpenAIError(
            404,
            f"The model '{name}' does not exist or is disabled.",
            param="model",
            code="model_not_found",
        )
    return model


async def _engine(model: ModelConfig) -> Engine:
    service = current_service()
    # Admission: a generation's pool steps are never refused once it has started,
    # so refuse here (503 + Retry-After) while the pool and its queue are full.
    service.executor.check_capacity()
    engines: EngineRegistry = await service.resources.get(ENGINES)
    return await engines.get(model)


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
    return {
        "object": "list",
        "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": m.engine}
            for m in models
            if m.enabled
        ],
    }


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


async def _start(
    body: ChatCompletionRequest | CompletionRequest, request: GenerationRequest, prefix: str
) -> tuple[Generation, dict[str, Any]]:
    """Resolve the model and its engine; the answer's common head."""
    model = await _model(body.model)
    engine = await _engine(model)
    AI_COUNTERS.requests += 1
    head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.name}
    return Generation(engine, request, AI_COUNTERS), head


def _wants_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


Chunk = Callable[[dict[str, Any], str | None, str | None, bool], dict[str, Any]]


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


def _stream(generation: Generation, head: dict[str, Any], usage: bool, chunk: Chunk) -> Response:
    AI_COUNTERS.streams += 1

    async def events() -> AsyncIterator[Any]:
        yield chunk(head, "" if chunk is _chat_chunk else None, None, True)
        async for piece in generation.pieces():
            yield chunk(head, piece, None, False)
        yield chunk(head, None, generation.finish_reason, False)
        if usage:
            yield {**chunk(head, None, None, False), "choices": [], "usage": generation.usage()}
        yield "[DONE]"

    return sse(events())
