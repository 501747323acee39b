"""``/admin/models``: list, read, create, update and delete models (bearer token).

Registered only when ``admin_token`` is set. Each engine checks its parameters when a
model is written (400 naming the parameter; unknown ones refused). Write-only
parameters (an upstream's ``api_key``) are never returned: they read ``"***"``.

A write answers once every worker of this host serves it: the handler asks the
refresh leader to poll at once and waits (at most ``2 * refresh_interval + 2`` s) for
each worker to swap in the new snapshot. ``X-Model-Visible: true`` says it did;
``false`` that the wait ran out (the change is stored and arrives with the next good
refresh: see ``/readyz``).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from pydantic import ValidationError
from quart import Blueprint, request

from ..context import data, engines, settings
from ..data.models import ModelConfig
from ..engines.parameters import EngineParameters, check_parameters, parameters_schema, redact
from ..errors import InvalidParameter, ModelNotFound, Unauthorized
from .admin_schemas import ModelCreate, ModelUpdate

__all__ = ["VISIBLE_HEADER", "admin"]

admin = Blueprint("admin", __name__, url_prefix="/admin")

#: Response header of a write: whether every worker of this host serves it already.
VISIBLE_HEADER = "X-Model-Visible"


@admin.before_request
async def _authorise() -> None:
    expected = settings().admin_token
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken does not reveal how much of the token matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("Send 'Authorization: Bearer <admin token>'.")


async def _payload() -> dict[str, Any]:
    try:
        body = json.loads((await request.get_data(False, False, False)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidParameter("The request body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise InvalidParameter("The request body must be a JSON object.")
    return body


def _check(error: ValidationError) -> InvalidParameter:
    first = error.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"])
    message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
    return InvalidParameter(f"field {field!r}: {message}", param=field)


async def _schema(engine: str) -> type[EngineParameters] | None:
    """The parameters ``engine`` declares; 400 if no such engine is installed."""
    factories = (await engines().engines()).factories
    factory = factories.get(engine)
    if factory is None:
        installed = ", ".join(sorted(factories))
        raise InvalidParameter(
            f"engine {engine!r} is not installed; installed: {installed}", param="engine"
        )
    return parameters_schema(factory)


async def _view(model: ModelConfig) -> dict[str, Any]:
    """The model as the API shows it: write-only parameters redacted."""
    factory = (await engines().engines()).factories.get(model.engine)
    schema = parameters_schema(factory) if factory is not None else None
    shown = model.as_dict()
    shown["parameters"] = redact(schema, shown["parameters"])
    return shown


async def _existing(name: str) -> ModelConfig:
    model = await data().models.get(name)
    if model is None:
        raise ModelNotFound(f"no model named {name!r}")
    return model


async def _served() -> dict[str, str]:
    visible = await data().models_served()
    return {VISIBLE_HEADER: "true" if visible else "false"}


@admin.get("/models")
async def list_models() -> dict[str, Any]:
    """Every model, enabled or not, as the database has it now."""
    return {"models": [await _view(model) for model in await data().models.all()]}


@admin.get("/models/<path:name>")
async def get_model(name: str) -> dict[str, Any]:
    """One model, as the database has it now."""
    return await _view(await _existing(name))


@admin.post("/models")
async def create_model() -> tuple[dict[str, Any], int, dict[str, str]]:
    """Create a model; answers once every worker of this host serves it."""
    try:
        body = ModelCreate.model_validate(await _payload())
    except ValidationError as exc:
        raise _check(exc) from None
    schema = await _schema(body.engine)
    parameters = check_parameters(schema, body.parameters)
    model = await data().models.create(body.name, body.engine, parameters, body.enabled)
    return await _view(model), 201, await _served()


@admin.patch("/models/<path:name>")
async def update_model(name: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Change a model's engine, parameters or enabled flag (``parameters`` replaces the
    stored object; a write-only one sent as ``"***"`` keeps its value)."""
    try:
        body = ModelUpdate.model_validate(await _payload())
    except ValidationError as exc:
        raise _check(exc) from None
    if body.engine is None and body.parameters is None and body.enabled is None:
        raise InvalidParameter("nothing to change: send engine, parameters or enabled")
    current = await _existing(name)
    engine = body.engine if body.engine is not None else current.engine
    parameters = None
    if body.engine is not None or body.parameters is not None:
        given = body.parameters if body.parameters is not None else current.as_dict()["parameters"]
        stored = current.as_dict()["parameters"]
        parameters = check_parameters(await _schema(engine), given, stored)
    model = await data().models.update(
        name, engine=body.engine, parameters=parameters, enabled=body.enabled
    )
    if model is None:  # deleted meanwhile
        raise ModelNotFound(f"no model named {name!r}")
    return await _view(model), 200, await _served()


@admin.delete("/models/<path:name>")
async def delete_model(name: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Delete a model; answers (with the row it was) once no worker of this host
    serves it. Streams already running on it finish; new requests get 404."""
    model = await data().models.delete(name)
    if model is None:
        raise ModelNotFound(f"no model named {name!r}")
    return await _view(model), 200, await _served()
