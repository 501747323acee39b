"""The snapshot: an immutable copy of the refreshable data, with its generation.

A request takes one snapshot and sees it from start to end, even if a newer one is
swapped in meanwhile. Snapshots travel between processes as JSON (the leader
publishes, followers read), so they round-trip through :meth:`Snapshot.to_json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["ModelConfig", "Snapshot"]


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
        """From a published entry or a row whose ``parameters`` is already parsed."""
        return cls(
            name=data["name"],
            engine=data["engine"],
            parameters=_freeze(data["parameters"]),
            enabled=bool(data["enabled"]),
            updated_at=data["updated_at"],
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "name": self.name,
            "engine": self.engine,
            "parameters": _thaw(self.parameters),
            "enabled": self.enabled,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The refreshable data at one database revision, published as one generation."""

    generation: int
    revision: int
    loaded_at: float
    models: Mapping[str, ModelConfig] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_rows(
        cls, generation: int, revision: int, rows: Sequence[Mapping[str, Any]]
    ) -> Snapshot:
        """Build from ``models`` rows (``parameters`` as JSON text)."""
        models = {
            row["name"]: ModelConfig.from_mapping(
                {**row, "parameters": json.loads(row["parameters"])}
            )
            for row in rows
        }
        return cls(generation, revision, time.time(), MappingProxyType(models))

    def to_json(self) -> str:
        """The published form."""
        return json.dumps(
            {
                "generation": self.generation,
                "revision": self.revision,
                "loaded_at": self.loaded_at,
                "models": [m.as_dict() for m in self.models.values()],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        """Parse the published form."""
        data = json.loads(text)
        models = {m["name"]: ModelConfig.from_mapping(m) for m in data["models"]}
        return cls(
            int(data["generation"]),
            int(data["revision"]),
            float(data["loaded_at"]),
            MappingProxyType(models),
        )
