"""``/admin/models``: list, create, update and disable models (bearer token).

Registered only when ``admin_token`` is set. Writes go to the database; every worker
(this one included) serves the change after the leader's next refresh, within
``refresh_interval``.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from pydantic import ValidationError
from quart import Blueprint, request

from ..data.snapshot import ModelConfig
from ..engines.registry import EngineRegistry
from ..errors import Conflict, InvalidParameter, NotFound, Unauthorized
from ..service import current_service, database
from .schemas import ModelCreate, ModelUpdate
from .wiring import ENGINES

__all__ = ["admin"]

admin = Blueprint("admin", __name__, url_prefix="/admin")

_ROW = "SELECT name, engine, parameters, enabled, updated_at FROM models"
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"


class ModelNotFound(NotFound):
    """No such model."""

    code = "model_not_found"


@admin.before_request
async def _authorise() -> None:
    expected = current_service().settings.admin_token
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken does not reveal how much of the token matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("Send 'Authorization: Bearer <admin token>'.")


async def _payload() -> dict[str, Any]:
    try:
        data = json.loads((await request.get_data(False, False, False)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidParameter("The request body must be a JSON object.") from None
    if not isinstance(data, dict):
        raise InvalidParameter("The request body must be a JSON object.")
    return data


def _check(error: ValidationError) -> InvalidParameter:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    return InvalidParameter(f"field {field!r}: {first['msg']}")


async def _known_engine(name: str) -> None:
    engines: EngineRegistry = await current_service().resources.get(ENGINES)
    if name not in engines.factories:
        installed = ", ".join(sorted(engines.factories))
        raise InvalidParameter(f"engine {name!r} is not installed; installed: {installed}")


async def _row(name: str) -> dict[str, Any]:
    db = await database()
    row = await db.fetchone(_ROW + " WHERE name = ?", (name,))
    if row is None:
        raise ModelNotFound(f"no model named {name!r}")
    return _model_json(dict(row))


def _model_json(row: dict[str, Any]) -> dict[str, Any]:
    return ModelConfig.from_mapping({**row, "parameters": json.loads(row["parameters"])}).as_dict()


@admin.get("/models")
async def list_models() -> dict[str, Any]:
    """Every model, enabled or not, as the database has it now."""
    db = await database()
    rows = await db.fetchall(_ROW + " ORDER BY name")
    return {"models": [_model_json(dict(r)) for r in rows]}


@admin.post("/models")
async def create_model() -> tuple[dict[str, Any], int]:
    """Create a model."""
    try:
        body = ModelCreate.model_validate(await _payload())
    except ValidationError as exc:
        raise _check(exc) from None
    await _known_engine(body.engine)
    db = await database()
    if await db.fetchone("SELECT 1 FROM models WHERE name = ?", (body.name,)):
        raise Conflict(f"a model named {body.name!r} exists; PATCH /admin/models/{body.name}")
    await db.execute(
        "INSERT INTO models (name, engine, parameters, enabled) VALUES (?, ?, ?, ?)",
        (body.name, body.engine, json.dumps(body.parameters), int(body.enabled)),
    )
    return await _row(body.name), 201


@admin.patch("/models/<path:name>")
async def update_model(name: str) -> dict[str, Any]:
    """Change a model's engine, parameters or enabled flag."""
    try:
        body = ModelUpdate.model_validate(await _payload())
    except ValidationError as exc:
        raise _check(exc) from None
    changes: dict[str, Any] = {}
    if body.engine is not None:
        await _known_engine(body.engine)
        changes["engine"] = body.engine
    if body.parameters is not None:
        changes["parameters"] = json.dumps(body.parameters)
    if body.enabled is not None:
        changes["enabled"] = int(body.enabled)
    if not changes:
        raise InvalidParameter("nothing to change: send engine, parameters or enabled")
    assignments = ", ".join(f"{column} = ?" for column in changes)
    db = await database()
    updated = await db.execute(
        f"UPDATE models SET {assignments}, updated_at = {_NOW} WHERE name = ?",
        (*changes.values(), name),
    )
    if updated == 0:
        raise ModelNotFound(f"no model named {name!r}")
    return await _row(name)


@admin.delete("/models/<path:name>")
async def disable_model(name: str) -> dict[str, Any]:
    """Disable a model (the row stays; PATCH enabled=true brings it back)."""
    db = await database()
    updated = await db.execute(
        f"UPDATE models SET enabled = 0, updated_at = {_NOW} WHERE name = ?", (name,)
    )
    if updated == 0:
        raise ModelNotFound(f"no model named {name!r}")
    return await _row(name)
