"""A team plugin whose own migration fails (``QUART_SERVICE_BLUEPRINTS=
tests.apps.broken_migration:plugin``): its routes, dataset and table must not take the
rest of the service down when ``plugin_failure=skip``."""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint

from quart_service import Dataset, Plugin

bp = Blueprint("broken_team", __name__, url_prefix="/broken")

NOTES = Dataset(
    "broken_team.notes", tables=["broken_team_notes"], query="SELECT id FROM broken_team_notes"
)


@bp.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "never served while the migration fails"}


plugin = Plugin(bp, datasets=[NOTES], migrations=Path(__file__).parent / "broken_migrations")
