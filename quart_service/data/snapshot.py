"""The snapshot: every dataset's current version, as one immutable value.

A request takes one snapshot and sees it from start to end, even if a newer one is
swapped in meanwhile. A snapshot holds a :class:`~quart_service.data.published.DatasetView`
per dataset that has loaded, and the trouble of those whose last load failed: they keep
their last good version and are reported stale by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar, overload

from ..errors import DatasetUnavailable
from .datasets import Dataset
from .models import MODELS, ModelConfig
from .published import DatasetView

__all__ = ["DatasetTrouble", "Snapshot"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DatasetTrouble:
    """Why a dataset is stale: its loader's last error, failing since when."""

    error: str
    failing_since: float

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {"error": self.error, "failing_since": self.failing_since}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The datasets as published in one generation."""

    generation: int
    loaded_at: float
    datasets: Mapping[str, DatasetView[Any]] = field(default_factory=lambda: MappingProxyType({}))
    trouble: Mapping[str, DatasetTrouble] = field(default_factory=lambda: MappingProxyType({}))
    #: A digest of every dataset's stamp: names this data on every host (computed once
    #: here; every cached() call scopes its key with it).
    stamp: str = field(init=False, default="")

    def __post_init__(self) -> None:
        text = ";".join(f"{name}@{stamp}" for name, stamp in self.stamps().items())
        object.__setattr__(self, "stamp", hashlib.blake2b(text.encode(), digest_size=6).hexdigest())

    @overload
    def dataset(self, spec: Dataset[T]) -> DatasetView[T]: ...
    @overload
    def dataset(self, spec: str) -> DatasetView[Any]: ...
    def dataset(self, spec: Dataset[Any] | str) -> DatasetView[Any]:
        """The version of a dataset in this snapshot; :class:`DatasetUnavailable` (503)
        if it has never loaded."""
        name = spec if isinstance(spec, str) else spec.name
        view = self.datasets.get(name)
        if view is None:
            trouble = self.trouble.get(name)
            reason = f": {trouble.error}" if trouble else " (it is not declared or not loaded)"
            raise DatasetUnavailable(f"dataset {name!r} has no loaded version{reason}")
        return view

    @property
    def models(self) -> Mapping[str, ModelConfig]:
        """The models table, by name (the ``models`` dataset's value)."""
        return self.dataset(MODELS).value

    def versions(self) -> dict[str, int]:
        """Each loaded dataset's version."""
        return {name: view.version for name, view in sorted(self.datasets.items())}

    def stamps(self) -> dict[str, str]:
        """Each loaded dataset's revision stamp (the same on every host)."""
        return {name: view.stamp for name, view in sorted(self.datasets.items())}
