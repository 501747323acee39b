"""Request bodies under ``/v1``: read, parsed and validated (on the pool when large, so
one request never holds the event loop), and the first error named the way OpenAI
names it (``param``: ``messages.0.role``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import request

from ..context import pool
from ..errors import InvalidParameter

__all__ = ["LARGE_BODY", "parse", "read_body", "run_sync"]

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
# A body larger than this is parsed and validated on the pool: json.loads of a 10 MB
# body holds the GIL ~10 ms, well within budget, but a body of many small strings
# costs far more per byte.
LARGE_BODY = 1024 * 1024


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the worker's pool (503 when the pool and its queue are full)."""
    return await asyncio.wrap_future(pool().submit(fn, *args))


def parse(raw: bytes, schema: type[M]) -> tuple[dict[str, Any], M]:
    """``raw`` as a JSON object and as ``schema`` validated it; 400 in OpenAI's shape,
    naming the field at fault, when it is neither."""
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
        return data, schema.model_validate(data)
    except ValidationError as exc:
        param, message = _first_error(exc)
        text = f"Invalid value for '{param}': {message}." if param else message
        raise InvalidParameter(text, param=param, code="invalid_value") from None


# Parts of a pydantic error location that name a branch of a union, not a field.
_BRANCHES = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})
_PART_TAGS = frozenset({"text", "image_url", "input_audio", "file", "refusal"})


def _clean(loc: tuple[int | str, ...]) -> list[str]:
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts.append(str(part))
        elif "[" in part or part in _BRANCHES or part[:1].isupper():
            continue
        elif part in _PART_TAGS and i + 1 < len(loc) and isinstance(loc[i - 1], int):
            continue  # a tagged union's tag (messages.0.content.0.<tag>.text)
        else:
            parts.append(part)
    return parts


def _first_error(exc: ValidationError) -> tuple[str | None, str]:
    """The field at fault and why: of a union's errors, the most specific one."""
    errors = exc.errors()
    best = max(errors, key=lambda e: len(_clean(e["loc"])))
    param = ".".join(_clean(best["loc"])) or None
    return param, best["msg"]


async def read_body(schema: type[M]) -> tuple[dict[str, Any], M]:
    """The body as sent and as validated. A large body is parsed on the pool."""
    raw = await request.get_data(False, False, False)  # 413 past max_body_size
    if len(raw) > LARGE_BODY:
        return await run_sync(parse, raw, schema)
    return parse(raw, schema)
