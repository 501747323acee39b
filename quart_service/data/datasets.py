"""Datasets: the data a worker's singletons read, declared once, refreshed once per host.

A dataset names the tables it reads and how to load it: a SQL query, or an async
loader given the worker's :class:`~quart_service.data.database.Database`::

    FLAGS = Dataset("flags", tables=["feature_flags"],
                    query="SELECT name, enabled FROM feature_flags", key="name")

    async def load_limits(db: Database) -> list[dict[str, Any]]:
        return [dict(row) for row in await db.fetchall("SELECT ...", kind="load")]

    LIMITS = Dataset("limits", tables=["tenants", "plans"], loader=load_limits,
                     build=lambda view: {row["tenant"]: row["rpm"] for row in view})

The refresh leader watches the named tables' revision markers and reloads a dataset
only when one of them moved. Every worker reads the published version through a
:class:`~quart_service.data.published.DatasetView`. ``build`` turns the rows into the
object a singleton wants (a dict, a trie, a compiled model); it runs at most once per
version per worker, on first use of ``view.value``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic

from typing_extensions import TypeVar

if TYPE_CHECKING:
    from .database import Database
    from .published import DatasetView

__all__ = ["Dataset", "Loader"]

# What ``build`` makes; None when the dataset declares no ``build`` (PEP 696 default,
# so ``Dataset("flags", ...)`` needs no annotation).
T = TypeVar("T", default=None)

#: An async loader: given the database handle, returns the rows (mappings with the
#: same keys; values are numbers, text, bytes or None).
Loader = Callable[["Database"], Awaitable[Iterable[Mapping[str, Any]]]]

_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _no_build(view: DatasetView[Any]) -> Any:
    return None


@dataclass(frozen=True, slots=True, eq=False)
class Dataset(Generic[T]):
    """The declaration of a dataset; holds no data and opens nothing.

    ``tables``: the tables whose changes make it reload. ``query`` or ``loader``: how
    it loads (exactly one). ``key``: the column :meth:`DatasetView.get` looks up
    (indexed in the published copy). ``build``: rows to the object views use.
    ``required``: ``/readyz`` fails while it has never loaded or is too stale.
    """

    name: str
    tables: Sequence[str]
    query: str | None = None
    loader: Loader | None = None
    key: str | None = None
    build: Callable[[DatasetView[Any]], T] = field(default=_no_build)
    required: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"dataset name {self.name!r}: use lower-case letters, digits, '_', '.', '-' "
                "(it names files and metric labels)"
            )
        tables = tuple(self.tables)
        if not tables:
            raise ValueError(f"dataset {self.name!r} names no tables: it would never reload")
        for table in tables:
            if not _TABLE.match(table):
                raise ValueError(f"dataset {self.name!r}: {table!r} is not a table name")
        object.__setattr__(self, "tables", tables)
        if (self.query is None) == (self.loader is None):
            raise ValueError(f"dataset {self.name!r}: give exactly one of query= or loader=")
