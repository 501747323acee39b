"""A team blueprint that claims a route the example team already serves."""

from __future__ import annotations

from quart import Blueprint

bp = Blueprint("other_team", __name__)


@bp.get("/team/hello")
async def hello() -> str:
    return "mine"
