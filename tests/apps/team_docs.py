"""A team's blueprint for the OpenAPI tests (mounted through the ``blueprints`` setting)."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

bp = Blueprint("inventory", __name__)


@bp.get("/inventory/items/<int:item_id>")
async def item(item_id: int) -> dict[str, Any]:
    """One inventory item by its number.

    A team's route: the service documents it from this docstring.
    """
    return {"id": item_id}
