"""The models table: the one place its SQL is written.

The ``models`` dataset (:data:`MODELS`) is how every worker reads it: refreshed once
per host like any other dataset, its value is a read-only mapping of name to
:class:`ModelConfig`. The admin API reads and writes single rows through
:class:`ModelRepository`, on the worker's one
:class:`~quart_service.data.database.Database` handle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from ..errors import Conflict
from .database import Database
from .datasets import Dataset
from .published import DatasetView

__all__ = ["MODELS", "ModelConfig", "ModelRepository"]

_COLUMNS = "name, engine, parameters, enabled, updated_at"


def _now() -> str:
    """The time as the tables store it, ``2026-11-25T18:56:48.123Z`` (UTC, ms): passed as
    a parameter, so the statements run on SQLite and PostgreSQL alike."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One row of ``models``: which engine serves a model name, with what parameters."""

    name: str
    engine: str
    parameters: Mapping[str, Any]
    enabled: bool
    updated_at: str

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ModelConfig:
        """From a published entry, or a row whose ``parameters`` is already parsed."""
        return cls(
            name=data["name"],
            engine=data["engine"],
            parameters=_freeze(data["parameters"]),
            enabled=bool(data["enabled"]),
            updated_at=data["updated_at"],
        )

    @classmethod
    def from_row(cls, row: Any) -> ModelConfig:
        """From a database row (``sqlite3.Row``, ``aiosqlite.Row``, ``asyncpg.Record``:
        anything ``dict()`` takes; ``parameters`` stored as JSON text)."""
        return cls.from_mapping({**dict(row), "parameters": json.loads(row["parameters"])})

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "name": self.name,
            "engine": self.engine,
            "parameters": _thaw(self.parameters),
            "enabled": self.enabled,
            "updated_at": self.updated_at,
        }


def _by_name(view: DatasetView[Any]) -> Mapping[str, ModelConfig]:
    return MappingProxyType({row["name"]: ModelConfig.from_row(row) for row in view})


#: Every model row, by name: what the v1 API and the engines read.
MODELS: Dataset[Mapping[str, ModelConfig]] = Dataset(
    "models",
    tables=["models"],
    query=f"SELECT {_COLUMNS} FROM models ORDER BY name",
    key="name",
    build=_by_name,
    required=True,
)


class ModelRepository:
    """Reads and writes the ``models`` table."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def all(self, *, kind: str = "read") -> list[ModelConfig]:
        """Every model, enabled or not, ordered by name."""
        rows = await self._database.fetchall(
            f"SELECT {_COLUMNS} FROM models ORDER BY name", kind=kind
        )
        return [ModelConfig.from_row(row) for row in rows]

    async def get(self, name: str) -> ModelConfig | None:
        """The model called ``name``, if there is one."""
        row = await self._database.fetchone(
            f"SELECT {_COLUMNS} FROM models WHERE name = ?", (name,), kind="read"
        )
        return None if row is None else ModelConfig.from_row(row)

    async def create(
        self, name: str, engine: str, parameters: Mapping[str, Any], enabled: bool
    ) -> ModelConfig:
        """Add a model; :class:`Conflict` if the name is taken."""
        if await self.get(name) is not None:
            raise Conflict(f"a model named {name!r} exists; PATCH /admin/models/{name}")
        now = _now()
        await self._database.execute(
            "INSERT INTO models (name, engine, parameters, enabled, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (name, engine, json.dumps(parameters), int(enabled), now, now),
            kind="write",
        )
        created = await self.get(name)
        assert created is not None
        return created

    async def update(
        self,
        name: str,
        *,
        engine: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        enabled: bool | None = None,
    ) -> ModelConfig | None:
        """Change the given fields of a model; None if there is no such model."""
        changes: dict[str, Any] = {}
        if engine is not None:
            changes["engine"] = engine
        if parameters is not None:
            changes["parameters"] = json.dumps(parameters)
        if enabled is not None:
            changes["enabled"] = int(enabled)
        if changes:
            # Column names come from the keys above, never from the request.
            assignments = ", ".join(f"{column} = ?" for column in changes)
            updated = await self._database.execute(
                f"UPDATE models SET {assignments}, updated_at = ? WHERE name = ?",
                (*changes.values(), _now(), name),
                kind="write",
            )
            if updated == 0:
                return None
        return await self.get(name)

    async def delete(self, name: str) -> ModelConfig | None:
        """Remove a model; the row it was, or None if there was none."""
        model = await self.get(name)
        if model is None:
            return None
        deleted = await self._database.execute(
            "DELETE FROM models WHERE name = ?", (name,), kind="write"
        )
        return model if deleted else None

    async def revision(self) -> int | None:
        """The table's change marker now (None if the table is not watched): a write
        is served by a worker once its snapshot was loaded at this revision or later."""
        row = await self._database.fetchone(
            "SELECT revision FROM table_revisions WHERE table_name = ?", ("models",), kind="read"
        )
        return None if row is None else int(row[0])
