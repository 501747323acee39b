"""The snapshot: an immutable copy of the refreshable data, with its generation.

A request takes one snapshot and sees it from start to end, even if a newer one is
swapped in meanwhile. Snapshots travel between processes as JSON (the leader
publishes, followers read), so they round-trip through :meth:`Snapshot.to_json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .models import ModelConfig

__all__ = ["Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The refreshable data at one database revision, published as one generation."""

    generation: int
    revision: int
    loaded_at: float
    models: Mapping[str, ModelConfig] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, generation: int, revision: int, models: Iterable[ModelConfig]) -> Snapshot:
        """A snapshot loaded now."""
        by_name = MappingProxyType({model.name: model for model in models})
        return cls(generation, revision, time.time(), by_name)

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
