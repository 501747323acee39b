"""An example team blueprint: written with the Flask API a team already knows.

Installed as its own distribution, it is found through the entry point
``quart_service.blueprints`` and mounted at ``/team`` (its default prefix). It brings:

* its own migrations (``migrations/``: the ``team_prompts`` table), applied once per
  host after the service's own, with their own version history;
* a dataset (``PROMPTS``) read from that table, refreshed once per host and shared by
  every worker;
* a resource built from the dataset (``RENDERER``), rebuilt once per worker when a
  prompt changes, while requests in flight keep the one they have.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from string import Template
from typing import Any

from quart import Blueprint, Response, abort, g, jsonify, request, url_for

from quart_service import Dataset, DatasetView, Plugin, Resource, dataset, resources, sse

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

# The team's data: refreshed once per host when team_prompts changes (any writer).
PROMPTS: Dataset[None] = Dataset(
    "team_example.prompts",
    tables=["team_prompts"],
    query="SELECT name, template, updated_at FROM team_prompts",
    key="name",
)


class Renderer:
    """Every prompt template, compiled once per version of the dataset."""

    def __init__(self, prompts: DatasetView[None]) -> None:
        self.version = prompts.version
        self.templates = {row["name"]: Template(row["template"]) for row in prompts}
        self.built_at = time.time()

    def render(self, name: str, **values: str) -> str | None:
        template = self.templates.get(name)
        # safe_substitute: a template from the database never raises on a missing name.
        return None if template is None else template.safe_substitute(values)


async def build_renderer() -> Renderer:
    # Outside a request, dataset() returns the version this worker serves now.
    return Renderer(await dataset(PROMPTS))


RENDERER = Resource("team_example.renderer", build_renderer, datasets=[PROMPTS])


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


@bp.get("/prompts/<name>")
async def prompt(name: str) -> dict[str, Any]:
    prompts = await dataset(PROMPTS)  # the same version for the whole request
    row = prompts.get(name)
    if row is None:
        abort(404)
    renderer = await resources().get(RENDERER)
    return {
        "name": name,
        "template": row["template"],
        "rendered": renderer.render(name, who=request.args.get("who", "world")),
        "version": prompts.version,
        "renderer_version": renderer.version,
        "pid": os.getpid(),
    }


@bp.get("/stream")
async def stream() -> Response:
    async def numbers() -> AsyncIterator[dict[str, int]]:
        for n in range(3):
            yield {"n": n}

    return sse(numbers())


plugin = Plugin(
    bp,
    resources=[INDEX, RENDERER],
    datasets=[PROMPTS],
    migrations=Path(__file__).parent / "migrations",
)
