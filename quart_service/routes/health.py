"""``/livez``, ``/readyz`` and the operator's ``/debug/identity``.

Both ``/readyz`` and ``/debug/identity`` ask every part of the worker for its own
answer (:func:`~quart_service.part.readiness_of`, :func:`~quart_service.part.identity_of`).
"""

from __future__ import annotations

import os
from typing import Any

from quart import Blueprint, Response, jsonify

from ..part import current_parts, identity_of, readiness_of

__all__ = ["health", "identity"]

health = Blueprint("health", __name__)
identity = Blueprint("identity", __name__)


@health.get("/livez")
async def livez() -> dict[str, Any]:
    """The process answers; nothing else is checked (a restart would not help)."""
    return {"status": "ok", "pid": os.getpid()}


@health.get("/readyz")
async def readyz() -> tuple[Response, int]:
    """Ready when every part is (schema current, snapshot fresh, required resources
    ready, not draining); 503 with every part's reasons otherwise."""
    ready = await readiness_of(current_parts())
    body = {
        "status": "ready" if not ready.problems else "not_ready",
        "pid": os.getpid(),
        "checks": ready.checks,
        "problems": ready.problems,
    }
    return jsonify(body), 200 if not ready.problems else 503


@identity.get("/debug/identity")
async def whoami() -> dict[str, Any]:
    """Who this worker is: pid, threads, memory, and every part's own account."""
    return identity_of(current_parts())
