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

from ..context import data, engines, settings
from ..data.models import ModelConfig
from ..errors import InvalidParameter, ModelNotFound, Unauthorized
from .schemas import ModelCreate, ModelUpdate

__all__ = ["admin"]

admin = Blueprint("admin", __name__, url_prefix="/admin")


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
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    return InvalidParameter(f"field {field!r}: {first['msg']}", param=field)


async def _known_engine(name: str) -> None:
    factories = (await engines().engines()).factories
    if name not in factories:
        installed = ", ".join(sorted(factories))
        raise InvalidParameter(
            f"engine {name!r} is not installed; installed: {installed}", param="engine"
        )


def _found(model: ModelConfig | None, name: str) -> dict[str, Any]:
    if model is None:
        raise ModelNotFound(f"no model named {name!r}")
    return model.as_dict()


@admin.get("/models")
async def list_models() -> dict[str, Any]:
    """Every model, enabled or not, as the database has it now."""
    return {"models": [model.as_dict() for model in await data().models.all()]}


@admin.post("/models")
async def create_model() -> tuple[dict[str, Any], int]:
    """Create a model."""
    try:
        body = ModelCreate.model_validate(await _payload())
    except ValidationError as exc:
        raise _check(exc) from None
    await _known_engine(body.engine)
    model = await data().models.create(body.name, body.engine, body.parameters, body.enabled)
    return model.as_dict(), 201


@admin.patch("/models/<path:name>")
async def update_model(name: str) -> dict[str, Any]:
    """Change a model's engine, parameters or enabled flag."""
    try:
        body = ModelUpdate.model_validate(await _payload())
    except ValidationError as exc:
        raise _check(exc) from None
    if body.engine is None and body.parameters is None and body.enabled is None:
        raise InvalidParameter("nothing to change: send engine, parameters or enabled")
    if body.engine is not None:
        await _known_engine(body.engine)
    model = await data().models.update(
        name, engine=body.engine, parameters=body.parameters, enabled=body.enabled
    )
    return _found(model, name)


@admin.delete("/models/<path:name>")
async def disable_model(name: str) -> dict[str, Any]:
    """Disable a model (the row stays; PATCH enabled=true brings it back)."""
    return _found(await data().models.update(name, enabled=False), name)
