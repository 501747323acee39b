"""The OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``.

Every error under ``/v1`` has OpenAI's shape (rendered by :mod:`quart_service.errors`),
so the official clients raise their usual exceptions::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": "invalid_value"}}

A model whose engine generates here (``local``, ``neural``) honours the fields listed
in docs/api.md and refuses, with 400 naming it, any field it cannot honour
(:mod:`.compat`). A model whose engine is a :class:`~quart_service.engines.base.Proxy`
(``upstream``) has its request relayed: the body unchanged but for ``model``, the
answer unchanged, its status and error body included.

A stream that fails after its first event ends with an OpenAI error event,
``data: {"error": {...}}``, then ``data: [DONE]``: the official client raises
``APIError`` with that message. A relayed stream the upstream refuses is answered with
the upstream's status and body, like a whole answer: nothing has been sent yet.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import math
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from quart import Blueprint, Response, request

from ..config import split_list
from ..context import engines, pool, settings, snapshot
from ..data.models import ModelConfig
from ..engines.base import (
    Embedder,
    Engine,
    GenerationRequest,
    Message,
    Proxy,
    Token,
    TokenEngine,
)
from ..errors import InvalidParameter, ModelNotFound, ServiceError, Unauthorized
from ..streaming import sse
from .bodies import read_body, run_sync
from .compat import check_chat, check_completion
from .generation import SLICE, Chunk, Generation, closing, count_tokens, merge
from .relay import error_event, relay
from .schemas import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .shapes import ChatChunks, TextChunks, chat_logprobs, text_logprobs

__all__ = ["DEFAULT_MAX_TOKENS", "v1"]

_log = logging.getLogger("quart_service.api")

v1 = Blueprint("v1", __name__, url_prefix="/v1")
DEFAULT_MAX_TOKENS = 256


@v1.before_request
async def _authorise() -> None:
    """With ``api_keys`` set, every /v1 call needs ``Authorization: Bearer <key>``."""
    keys = split_list(settings().api_keys)
    if not keys or request.method == "OPTIONS":  # a CORS preflight carries no key
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # compare_digest against every key: the time taken reveals neither which key
    # matched nor how much of one.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.strip().encode(), key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise Unauthorized(
            "Incorrect or missing API key: send 'Authorization: Bearer <key>' with one "
            "of the keys the server was given (the api_keys setting).",
            code="invalid_api_key",
        )


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


@v1.get("/models")
async def list_models() -> dict[str, Any]:
    """The enabled models."""
    models = (await snapshot()).models.values()
    return {"object": "list", "data": [_model_object(m) for m in models if m.enabled]}


@v1.get("/models/<path:model_id>")
async def retrieve_model(model_id: str) -> dict[str, Any]:
    """One enabled model (``client.models.retrieve(id)``)."""
    return _model_object(await _model(model_id, param=None))


# -- generating here ---------------------------------------------------------------------


def _request(
    body: ChatCompletionRequest | CompletionRequest, prompt: str, choice: int, **extra: Any
) -> GenerationRequest:
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens or DEFAULT_MAX_TOKENS
    # Each choice its own seed (the same seed twice would write the same text twice).
    seed = body.seed + choice if body.seed is not None else None
    return GenerationRequest(
        prompt=prompt,
        max_tokens=limit,
        temperature=float(body.temperature if body.temperature is not None else 1.0),
        top_p=float(body.top_p if body.top_p is not None else 1.0),
        seed=seed,
        stop=body.stop_sequences(),
        **extra,
    )


async def _generations(
    engine: Engine, requests: list[GenerationRequest], prompt_tokens: int
) -> list[Generation]:
    counts = engines().counts
    counts.requests.inc()
    # The prompt's tokens count once however many choices are written from it.
    return [
        Generation(engine, r, counts, prompt_tokens if i == 0 else 0)
        for i, r in enumerate(requests)
    ]


def _usage(generations: list[Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(g.completion_tokens for g in generations)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _prompt_tokens(engine: Engine, prompt: str) -> int:
    return await count_tokens(engine.count_tokens, prompt, run_sync)


async def _whole(generation: Generation) -> tuple[str, list[Token]]:
    texts: list[str] = []
    tokens: list[Token] = []
    async for chunk in generation.chunks():
        texts.append(chunk.text)
        tokens.extend(chunk.tokens)
    return "".join(texts), tokens


async def _wholes(generations: list[Generation]) -> list[tuple[str, list[Token]]]:
    """Every generation's text and tokens; several choices are written concurrently."""
    if len(generations) == 1:  # no task to create for the usual single choice
        return [await _whole(generations[0])]
    return list(await asyncio.gather(*(_whole(g) for g in generations)))


def _head(prefix: str, model: ModelConfig) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.name}


@v1.post("/chat/completions")
async def chat_completions() -> Response | dict[str, Any]:
    """Chat completions, streamed as ``chat.completion.chunk`` events or answered whole."""
    raw, body = await read_body(ChatCompletionRequest)
    model = await _model(body.model)
    engine = await _engine(model)
    if isinstance(engine, Proxy):
        return await relay(engine, "chat/completions", raw)
    check_chat(body, isinstance(engine, TokenEngine))
    messages = tuple(Message(m.role, m.text()) for m in body.messages)
    prompt = "\n".join(m.content for m in messages)
    top = (body.top_logprobs or 0) if body.logprobs else None
    requests = [
        _request(body, prompt, i, messages=messages, logprobs=top) for i in range(body.choices())
    ]
    generations = await _generations(engine, requests, await _prompt_tokens(engine, prompt))
    head = _head("chatcmpl", model)
    if body.stream:
        return _stream(generations, head, _wants_usage(body), ChatChunks(top))
    wholes = await _wholes(generations)
    choices = []
    for i, (generation, (text, tokens)) in enumerate(zip(generations, wholes, strict=True)):
        message = {"role": "assistant", "content": text, "refusal": None}
        logprobs = chat_logprobs(tokens, top) if top is not None else None
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": generation.finish_reason,
            }
        )
    return {
        **head,
        "object": "chat.completion",
        "choices": choices,
        "usage": _usage(generations),
        "system_fingerprint": None,
    }


@v1.post("/completions")
async def completions() -> Response | dict[str, Any]:
    """Text completions of one prompt or a list (``n`` choices each, indexed prompt by
    prompt), streamed or answered whole."""
    raw, body = await read_body(CompletionRequest)
    model = await _model(body.model)
    engine = await _engine(model)
    if isinstance(engine, Proxy):
        return await relay(engine, "completions", raw)
    check_completion(body, isinstance(engine, TokenEngine))
    prompts, n = body.prompts(), body.choices()
    if len(prompts) * n > MAX_CHOICES:
        raise InvalidParameter(
            f"Invalid value for 'n': {len(prompts)} prompts times n={n} makes more than "
            f"{MAX_CHOICES} choices.",
            param="n",
            code="invalid_value",
        )
    requests, echoes, prompt_tokens = [], [], 0
    for prompt in prompts:
        prompt_tokens += await _prompt_tokens(engine, prompt)
        for j in range(n):
            requests.append(_request(body, prompt, j, logprobs=body.logprobs))
            echoes.append(prompt if body.echo else "")
    generations = await _generations(engine, requests, prompt_tokens)
    head = _head("cmpl", model)
    if body.stream:
        chunks = TextChunks(body.logprobs, echoes)
        return _stream(generations, head, _wants_usage(body), chunks)
    wholes = await _wholes(generations)
    choices = []
    for i, (generation, (text, tokens)) in enumerate(zip(generations, wholes, strict=True)):
        echo = echoes[i]
        logprobs = None
        if body.logprobs is not None:
            logprobs = text_logprobs(tokens, body.logprobs, len(echo))
        choices.append(
            {
                "index": i,
                "text": echo + text,
                "logprobs": logprobs,
                "finish_reason": generation.finish_reason,
            }
        )
    return {
        **head,
        "object": "text_completion",
        "choices": choices,
        "usage": _usage(generations),
    }


# -- streams -------------------------------------------------------------------------------


def _wants_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _ended(generation: Generation) -> AsyncGenerator[Chunk | None, None]:
    """The generation's chunks, then None when it has finished."""
    async with closing(generation.chunks()) as chunks:
        async for chunk in chunks:
            yield chunk
    yield None


def _stream(
    generations: list[Generation],
    head: dict[str, Any],
    usage: bool,
    chunks: ChatChunks | TextChunks,
) -> Response:
    engines().counts.streams.inc()
    where = f"{request.method} {request.path}"

    def event(choice: dict[str, Any] | None) -> dict[str, Any]:
        return {**head, "object": chunks.object, "choices": [choice] if choice else []}

    async def events() -> AsyncIterator[Any]:
        try:
            for index in range(len(generations)):
                yield event(chunks.start(index))
            async for index, chunk in merge([_ended(g) for g in generations]):
                if chunk is None:
                    yield event(chunks.finish(index, generations[index].finish_reason))
                else:
                    yield event(chunks.text(index, chunk))
            if usage:
                yield {**event(None), "usage": _usage(generations)}
        except ServiceError as exc:
            _log.warning("%s: a stream failed: %s: %s", where, exc.code, exc.message)
            yield error_event(exc)
        except Exception:
            _log.exception("%s: a stream failed", where)
            yield error_event(ServiceError("The server failed; the error was logged."))
        yield "[DONE]"

    return sse(events())


# -- embeddings ----------------------------------------------------------------------------


@v1.post("/embeddings")
async def embeddings() -> Response | dict[str, Any]:
    """Embeddings in OpenAI's shape, for one text or a list; ``encoding_format`` float
    or base64 (little-endian float32, what the official client asks for by default)."""
    raw, body = await read_body(EmbeddingRequest)
    model = await _model(body.model)
    engine = await _engine(model)
    if isinstance(engine, Proxy):
        return await relay(engine, "embeddings", raw)
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
    if sum(len(t) for t in texts) > SLICE:
        tokens = sum([await _prompt_tokens(engine, text) for text in texts])
    else:
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
