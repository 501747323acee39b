"""``upstream``: proxies to any OpenAI-compatible server, streaming chunk by chunk.

Parameters: ``base_url`` (for example ``http://127.0.0.1:9000/v1``), ``api_key``
(optional), ``model`` (the upstream's model name; default: this model's name).

The API relays requests through :meth:`UpstreamEngine.relay`: the body goes to the
upstream unchanged but for ``model`` (every other field, ``tools``, ``logprobs``,
``response_format``, a vendor's own, included), and the upstream's answer comes back
unchanged: its status and body, its ``Retry-After`` and rate-limit headers, its SSE
lines one by one.

All upstream traffic of a worker goes through its one pooled ``httpx.AsyncClient``.
The request is always a streaming one; when our client disconnects, the generator is
cancelled, which leaves ``client.stream(...)`` and closes the upstream response at
once, so the upstream stops generating too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
from pydantic import Field, SecretStr

from ..data.models import ModelConfig
from ..errors import EngineError
from .base import Engine, EngineContext, GenerationRequest, ProxyReply
from .parameters import EngineParameters, parameters

__all__ = ["RELAYED_HEADERS", "UpstreamEngine", "UpstreamParameters", "create"]

# The upstream's headers a client may act on: when to retry, how much quota is left.
RELAYED_HEADERS = ("retry-after", "retry-after-ms")
_RELAYED_PREFIX = "x-ratelimit-"


class UpstreamEngine:
    """Forwards generation to an OpenAI-compatible ``/chat/completions``."""

    def __init__(self, context: EngineContext, base_url: str, model: str, api_key: str) -> None:
        self._context = context
        self._base = base_url.rstrip("/")
        self._url = self._base + "/chat/completions"
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def count_tokens(self, text: str) -> int:
        # The upstream's tokenizer is unknown here; whitespace words are the estimate.
        return len(text.split())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages] or [
            {"role": "user", "content": request.prompt}
        ]
        body: dict[str, Any] = {
            "model": self._model,
            "messages": messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        client = await self._context.http_client()
        try:
            async with client.stream("POST", self._url, json=body, headers=self._headers) as reply:
                if reply.status_code != 200:
                    detail = (await reply.aread())[:500].decode(errors="replace")
                    raise EngineError(f"upstream answered {reply.status_code}: {detail}")
                async for line in reply.aiter_lines():
                    piece = _content(line)
                    if piece is None:
                        break
                    if piece:
                        yield piece
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream request failed: {type(exc).__name__}: {exc}") from exc

    async def relay(self, endpoint: str, body: dict[str, Any]) -> ProxyReply:
        """POST ``body`` (``model`` replaced by the upstream's name) to ``endpoint``; see
        :class:`~quart_service.engines.base.Proxy`."""
        client = await self._context.http_client()
        request = client.build_request(
            "POST",
            f"{self._base}/{endpoint}",
            json={**body, "model": self._model},
            headers=self._headers,
        )
        try:
            reply = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream request failed: {type(exc).__name__}: {exc}") from exc
        headers = {
            name: value
            for name, value in reply.headers.items()
            if name in RELAYED_HEADERS or name.startswith(_RELAYED_PREFIX)
        }
        if reply.status_code == 200 and body.get("stream") is True:
            return ProxyReply(200, headers, lines=_lines(reply))
        try:
            data = await reply.aread()
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream answer failed: {type(exc).__name__}: {exc}") from exc
        finally:
            await reply.aclose()
        return ProxyReply(reply.status_code, headers, data)

    async def aclose(self) -> None:
        return None  # the HTTP client is the process's, not this instance's


async def _lines(reply: httpx.Response) -> AsyncIterator[str]:
    """The upstream's SSE lines; its connection is released at the end or on close."""
    try:
        async for line in reply.aiter_lines():
            yield line
    except httpx.HTTPError as exc:
        raise EngineError(f"the upstream's stream failed: {type(exc).__name__}: {exc}") from exc
    finally:
        await reply.aclose()


def _content(line: str) -> str | None:
    """The text of one SSE line: '' for nothing, None at the end of the stream."""
    if not line.startswith("data:"):
        return ""
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    try:
        choices = json.loads(data).get("choices") or []
    except ValueError:
        return ""
    if not choices:
        return ""
    content = (choices[0].get("delta") or {}).get("content")
    return content if isinstance(content, str) else ""


class UpstreamParameters(EngineParameters):
    """The ``upstream`` engine's parameters; ``api_key`` is write-only (never returned
    by the admin API)."""

    # A host name or IPv4 address, an optional port, an optional path.
    base_url: Annotated[
        str,
        Field(pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^\s]*)?$", max_length=2000),
    ]
    api_key: SecretStr = Field(default_factory=lambda: SecretStr(""))
    model: Annotated[str, Field(min_length=1, max_length=200)] | None = None


@parameters(UpstreamParameters)
async def create(model: ModelConfig, context: EngineContext) -> Engine:
    """Build the engine for ``model`` from its parameters."""
    parameters = model.parameters
    base_url = parameters.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise EngineError("parameter 'base_url' must be an http(s) URL, e.g. http://host/v1")
    # An explicit null is the default, as the declared parameters allow it.
    upstream_model = parameters.get("model") or model.name
    api_key = parameters.get("api_key") or ""
    if not isinstance(upstream_model, str) or not isinstance(api_key, str):
        raise EngineError("parameters 'model' and 'api_key' must be text")
    return UpstreamEngine(context, base_url, upstream_model, api_key)
