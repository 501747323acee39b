"""Datasets in process: declarations, published files, views, snapshots, cache scopes."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from quart_service import Dataset, DatasetUnavailable, DatasetView, ServiceCache, Snapshot
from quart_service.data.markers import install_markers, missing_markers
from quart_service.data.migrations import apply_migrations
from quart_service.data.models import MODELS
from quart_service.data.published import Published, copy_query, write_rows
from quart_service.data.snapshot import DatasetTrouble


def _view(published: Published, name: str = "d", version: int = 1, **kw: Any) -> DatasetView[Any]:
    return DatasetView(
        name,
        version,
        published.path,
        columns=published.columns,
        rows=published.rows,
        key=kw.get("key"),
        loaded_at=0.0,
        build=kw.get("build", lambda view: None),
    )


def test_a_declaration_is_checked() -> None:
    with pytest.raises(ValueError, match="exactly one of query= or loader="):
        Dataset("flags", tables=["flags"])
    with pytest.raises(ValueError, match="names no tables"):
        Dataset("flags", tables=[], query="SELECT 1")
    with pytest.raises(ValueError, match="not a table name"):
        Dataset("flags", tables=["flags; DROP TABLE x"], query="SELECT 1")
    with pytest.raises(ValueError, match="dataset name"):
        Dataset("Flags!", tables=["flags"], query="SELECT 1")
    assert Dataset("flags", tables=["flags"], query="SELECT 1").tables == ("flags",)


def test_rows_are_published_read_by_key_and_built_once(tmp_path: Path) -> None:
    rows = [{"name": f"n{i}", "weight": i / 2, "blob": bytes([i]), "note": None} for i in range(50)]
    published = write_rows(tmp_path / "1.sqlite", rows, key="name")
    assert (published.columns, published.rows) == (("name", "weight", "blob", "note"), 50)
    builds = 0

    def build(view: DatasetView[Any]) -> dict[str, float]:
        nonlocal builds
        builds += 1
        return {row["name"]: row["weight"] for row in view}

    view = _view(published, key="name", build=build)
    assert len(view) == 50
    assert dict(view.get("n7")) == {"name": "n7", "weight": 3.5, "blob": b"\x07", "note": None}
    assert view.get("absent") is None
    assert [row["name"] for row in view.select("weight > ?", [24])] == ["n49"]
    assert view.value["n10"] == 5.0
    assert view.value is view.value
    assert builds == 1
    with pytest.raises(TypeError):
        view.get("n1")["weight"] = 1  # type: ignore[index]
    # A published file is never written again: readers open it immutable.
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        view._connection.execute("DELETE FROM dataset")


def test_bad_rows_are_refused_with_the_row_number(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="row 2 holds a dict"):
        write_rows(tmp_path / "x.sqlite", [{"a": 1}, {"a": {"nested": 1}}])
    with pytest.raises(ValueError, match="row 2 has no column 'b'"):
        write_rows(tmp_path / "y.sqlite", [{"a": 1, "b": 2}, {"a": 1}])
    with pytest.raises(ValueError, match="key column 'id'"):
        write_rows(tmp_path / "z.sqlite", [{"a": 1}], key="id")
    assert not list(tmp_path.glob("*"))  # nothing half-written is left behind


def test_an_empty_dataset_reads_as_empty(tmp_path: Path) -> None:
    view = _view(write_rows(tmp_path / "e.sqlite", [], key="k"), key="k")
    assert (len(view), list(view), view.get("k"), view.columns) == (0, [], None, ())


def test_a_query_is_copied_inside_sqlite_and_moves_its_markers(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite"
    apply_migrations(database)
    with sqlite3.connect(database, isolation_level=None) as db:
        db.execute("CREATE TABLE flags (name TEXT PRIMARY KEY, enabled INTEGER)")
        assert missing_markers(db, ["flags", "models"]) == ["flags"]
        assert install_markers(db, ["flags", "absent"]) == {
            "absent": "OperationalError: no such table: main.absent"
        }
        assert missing_markers(db, ["flags", "models"]) == []
        db.executemany("INSERT INTO flags VALUES (?, ?)", [("a", 1), ("b", 0)])
        db.execute("UPDATE flags SET enabled = 1")
        db.execute("DELETE FROM flags WHERE name = 'b'")
        revisions = dict(db.execute("SELECT table_name, revision FROM table_revisions"))
    assert revisions["flags"] == 2 + 2 + 1  # per row: two inserts, two updates, a delete
    published = copy_query(
        database, 5.0, "SELECT name, enabled FROM flags", tmp_path / "f.sqlite", key="name"
    )
    assert (published.columns, published.rows) == (("name", "enabled"), 1)
    assert dict(_view(published, key="name").get("a")) == {"name": "a", "enabled": 1}
    models = copy_query(database, 5.0, MODELS.query or "", tmp_path / "m.sqlite", key="name")
    view = _view(models, key="name", build=MODELS.build)
    assert view.value["local-ngram"].engine == "local"
    assert isinstance(view.value, MappingProxyType)


def test_a_snapshot_names_what_is_missing_and_why(tmp_path: Path) -> None:
    view = _view(write_rows(tmp_path / "a.sqlite", [{"k": 1}]), name="a")
    trouble = DatasetTrouble("OperationalError: no such table: b", 10.0)
    snapshot = Snapshot(4, 0.0, MappingProxyType({"a": view}), MappingProxyType({"b": trouble}))
    assert snapshot.dataset("a") is view
    assert snapshot.versions() == {"a": 1}
    with pytest.raises(DatasetUnavailable, match="'b' has no loaded version: OperationalError"):
        snapshot.dataset("b")
    with pytest.raises(DatasetUnavailable) as caught:
        snapshot.dataset("c")
    assert caught.value.status == 503
    assert caught.value.code == "dataset_unavailable"


async def test_a_change_retires_only_the_scopes_that_read_it() -> None:
    stamp = "a"
    cache = ServiceCache(60, lambda: cache.snapshot_scope(stamp))
    loads: list[str] = []

    def loader(name: str) -> Any:
        async def load() -> str:
            loads.append(name)
            return name

        return load

    flags_v1 = cache.dataset_scope({"flags": "1"})
    both = cache.dataset_scope({"flags": "1", "models": "1"})
    prompts = cache.dataset_scope({"prompts": "4.1"})
    for key, scope in [("f", flags_v1), ("fm", both), ("p", prompts), ("g", None)]:
        await cache.get_or_load(key, loader(key), scope=scope)
    # models moves to revision 2: the scopes that read it, and the snapshot's, retire.
    stamp = "b"
    retired = await cache.retire(
        cache.snapshot_scope("b"), {"flags": "1", "models": "2", "prompts": "4.1"}
    )
    assert retired == 2  # "fm" and the old snapshot scope
    for key, scope in [("f", flags_v1), ("p", prompts)]:
        assert await cache.get_or_load(key, loader(key), scope=scope) == key
    assert loads == ["f", "fm", "p", "g"]  # the others were still cached
    assert await cache.get_or_load("fm", loader("fm2"), scope=both) == "fm2"  # gone: reloaded
    await cache.close()
