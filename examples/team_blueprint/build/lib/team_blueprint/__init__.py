"""An example team blueprint: written with the Flask API a team already knows.

Installed as its own distribution, it is found through the entry point
``quart_service.blueprints`` and mounted at ``/team`` (its default prefix).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint, Response, abort, g, jsonify, request, url_for

from quart_service import Plugin, Resource, resources, sse

bp = Blueprint("team_example", __name__, url_prefix="/team")


class Index:
    """The team's own expensive singleton (a search index, say)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.created_at = time.time()


async def build_index() -> Index:
    await asyncio.sleep(0.2)  # pretend to load something
    return Index()


INDEX = Resource("team_example.index", build_index)


@bp.before_request
async def started() -> None:
    g.started = time.monotonic()


@bp.after_request
async def tag(response: Response) -> Response:
    response.headers["X-Team"] = "example"
    return response


@bp.errorhandler(404)
async def not_here(error: Exception) -> tuple[Response, int]:
    return jsonify({"team_error": "no such item"}), 404


@bp.get("/hello")
async def hello() -> Response:
    return jsonify(message="hello", started=hasattr(g, "started"), url=url_for(".item", item_id=7))


@bp.get("/items/<int:item_id>")
async def item(item_id: int) -> dict[str, Any]:
    if item_id > 100:
        abort(404)
    return {"item_id": item_id, "kind": type(item_id).__name__}


@bp.route("/echo", methods=["POST", "PUT"])
async def echo() -> dict[str, Any]:
    form = await request.form
    files = await request.files
    body = await request.get_json(silent=True)
    return {
        "method": request.method,
        "args": request.args.to_dict(),
        "json": body,
        "form": form.to_dict(),
        "files": {name: len(storage.read()) for name, storage in files.items()},
    }


@bp.get("/blocking")
def blocking() -> dict[str, Any]:
    """A plain def view, as in Flask: it runs on the service's pool."""
    time.sleep(0.01)
    return {"thread": threading.current_thread().name, "pid": os.getpid()}


@bp.get("/index")
async def index() -> dict[str, Any]:
    await resources().get(INDEX)
    status = next(s for s in resources().status() if s.name == INDEX.name)
    return {"pid": os.getpid(), "instance_id": status.instance_id}


@bp.get("/stream")
async def stream() -> Response:
    async def numbers() -> AsyncIterator[dict[str, int]]:
        for n in range(3):
            yield {"n": n}

    return sse(numbers())


plugin = Plugin(bp, resources=[INDEX])
