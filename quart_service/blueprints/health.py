"""``/livez``, ``/readyz`` and the operator's ``/debug/identity``."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

from quart import Blueprint, Response, jsonify

from .._proc import rss_bytes, thread_count
from ..api.openai import AI_COUNTERS
from ..api.wiring import ENGINES
from ..engines.registry import EngineRegistry
from ..resources import ResourceState
from ..service import Service, current_service

__all__ = ["health", "identity"]

health = Blueprint("health", __name__)
identity = Blueprint("identity", __name__)


@health.get("/livez")
async def livez() -> dict[str, Any]:
    """The process answers; nothing else is checked (a restart would not help)."""
    return {"status": "ok", "pid": os.getpid()}


@health.get("/readyz")
async def readyz() -> tuple[Response, int]:
    """Ready when the schema is current, every required resource (the snapshot among
    them) is ready and the data is fresh enough; 503 with the reasons otherwise."""
    service = current_service()
    if service.data.schema is None or service.data.schema.behind:
        await service.data.check_schema()  # migrated meanwhile? look again
    data_checks, problems = service.data.readiness()
    if service.draining:
        # Load balancers stop sending here; open work finishes (see _drain.py).
        problems.append("draining: the worker is shutting down")
    checks: dict[str, Any] = {"data": data_checks, "skipped_blueprints": service.plugins.skipped}
    for status in service.resources.status():
        if not status.required:
            continue
        checks[status.name] = status.state.value
        if status.state is not ResourceState.READY:
            detail = f": {status.error}" if status.error else ""
            problems.append(f"resource {status.name!r} is {status.state.value}{detail}")
    if problems:
        # A failed resource is retried now, so readiness recovers by itself.
        service.ensure_required()
    body = {
        "status": "ready" if not problems else "not_ready",
        "pid": os.getpid(),
        "checks": checks,
        "problems": problems,
    }
    return jsonify(body), 200 if not problems else 503


@identity.get("/debug/identity")
async def whoami() -> dict[str, Any]:
    """Who this worker is: pid, role, resources, pool, threads, streams."""
    service = current_service()
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "role": service.role,
        "started_at": service.started_at,
        "uptime": time.time() - (service.started_at or time.time()),
        "threads": thread_count(),
        "rss_bytes": rss_bytes(),
        "executor": asdict(service.executor.stats()),
        "resources": [status.as_dict() for status in service.resources.status()],
        "streams": asdict(service.streams),
        "data": service.data.identity(),
        "blueprints": {"mounted": service.plugins.mounted, "skipped": service.plugins.skipped},
        "ai": {**AI_COUNTERS.as_dict(), "engines": await _engines(service)},
    }


async def _engines(service: Service) -> list[dict[str, Any]]:
    """The engine instances this worker built (without building the registry)."""
    if not any(
        s.name == ENGINES and s.state is ResourceState.READY for s in service.resources.status()
    ):
        return []
    engines: EngineRegistry = await service.resources.get(ENGINES)
    return engines.status()
