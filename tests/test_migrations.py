"""Schema migrations on Alembic, on real SQLite files: the convention, the cheap path,
rollback of a failing revision, several sources, downgrade, adoption of a database the
SQL-file migrator left, concurrent appliers, and the ``quart-service migrate`` CLI."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from quart_service.data import MigrationError, apply_migrations, schema_status
from quart_service.data.migrations import (
    SERVICE,
    MigrationSource,
    discover,
    downgrade,
    migrate_to,
    migration_lock,
)
from quart_service.server.cli import main

from .support.server import ROOT


def _script(
    directory: Path,
    number: int,
    slug: str,
    upgrade: list[str],
    downgrade: list[str] | None = None,
    *,
    revision: str | None = None,
    down_revision: str | None = None,
) -> Path:
    """Write one revision script that runs the given statements."""
    directory.mkdir(parents=True, exist_ok=True)
    rev = revision if revision is not None else f'"{number:04d}"'
    down = down_revision
    if down is None:
        down = f'"{number - 1:04d}"' if number > 1 else "None"

    def body(statements: list[str]) -> str:
        return "".join(f"    op.execute({s!r})\n" for s in statements) or "    pass\n"

    path = directory / f"{number:04d}_{slug}.py"
    path.write_text(
        "from alembic import op\n\n"
        f"revision = {rev}\n"
        f"down_revision = {down}\n\n\n"
        f"def upgrade() -> None:\n{body(upgrade)}\n\n"
        f"def downgrade() -> None:\n{body(downgrade or [])}"
    )
    return path


def _query(database: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        return db.execute(sql).fetchall()


def _tables(database: Path) -> set[str]:
    return {r[0] for r in _query(database, "SELECT name FROM sqlite_master WHERE type='table'")}


def _columns(database: Path, table: str) -> list[str]:
    return [r[1] for r in _query(database, f"PRAGMA table_info({table})")]


# -- the service's own migrations -------------------------------------------------


def test_a_fresh_database_is_migrated_once_and_a_second_apply_does_nothing(
    tmp_path: Path,
) -> None:
    database = tmp_path / "db.sqlite"
    assert schema_status(database).behind
    assert not database.exists()  # asking does not create it
    applied = apply_migrations(database)
    assert [(m.version, m.source) for m in applied] == [
        (1, "service"),
        (2, "service"),
        (3, "service"),
    ]
    assert [m.path.name for m in applied] == [m.path.name for m in discover()]
    assert apply_migrations(database) == []
    status = schema_status(database)
    assert (status.current, status.latest, status.behind) == (3, 3, False)
    assert status.sources == {"service": (3, 3)}
    assert _query(database, "SELECT version_num FROM alembic_version") == [("0003",)]
    assert _query(database, "PRAGMA journal_mode") == [("wal",)]


def test_shipped_migrations_create_the_change_marker_triggers(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite"
    apply_migrations(database)
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:

        def revision() -> int:
            return int(
                db.execute(
                    "SELECT revision FROM table_revisions WHERE table_name = 'models'"
                ).fetchone()[0]
            )

        start = revision()
        db.execute("INSERT INTO models (name, engine) VALUES ('a', 'local')")
        db.execute("UPDATE models SET enabled = 0 WHERE name = 'a'")
        db.execute("DELETE FROM models WHERE name = 'a'")
        assert revision() == start + 3
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("INSERT INTO models (name, engine, parameters) VALUES ('b', 'x', 'nope')")
    triggers = {
        r[0] for r in _query(database, "SELECT name FROM sqlite_master WHERE type='trigger'")
    }
    assert triggers == {f"qs_revision_models_{e}" for e in ("insert", "update", "delete")}


def test_the_service_downgrades_to_zero_and_back(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite"
    apply_migrations(database)
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("INSERT INTO models (name, engine) VALUES ('mine', 'local')")

    reverted = downgrade(database, 5.0, SERVICE, 2)
    assert [m.version for m in reverted] == [3]
    # 0003 undone: the whole-database change marker is back, with the models revision
    # (two changes: 0002's default model and 'mine').
    assert "table_revisions" not in _tables(database)
    assert _query(database, "SELECT revision FROM change_marker") == [(2,)]
    names = {r[0] for r in _query(database, "SELECT name FROM sqlite_master WHERE type='trigger'")}
    assert names == {f"models_changed_{e}" for e in ("insert", "update", "delete")}

    assert [m.version for m in downgrade(database, 5.0, SERVICE, 0)] == [2, 1]
    assert _tables(database) == {"alembic_version"}
    assert schema_status(database).current == 0
    with pytest.raises(MigrationError, match="cannot go up to 2"):
        downgrade(database, 5.0, SERVICE, 2)

    assert [m.version for m in apply_migrations(database)] == [1, 2, 3]
    assert _query(database, "SELECT name FROM models") == [("local-ngram",)]
    assert [m.version for m in migrate_to(database, 5.0, SERVICE, 1)] == [3, 2]
    assert [m.version for m in migrate_to(database, 5.0, SERVICE, 3)] == [2, 3]
    with pytest.raises(MigrationError, match="has versions 0 to 3; cannot go to 4"):
        migrate_to(database, 5.0, SERVICE, 4)


# The SQL of 0001 and 0002 as the SQL-file migrator of earlier releases applied it.
_OLD_0001_0002 = """
CREATE TABLE change_marker (id INTEGER PRIMARY KEY CHECK (id = 1), revision INTEGER NOT NULL);
INSERT INTO change_marker (id, revision) VALUES (1, 0);
CREATE TABLE models (
    name       TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    engine     TEXT NOT NULL CHECK (length(engine) BETWEEN 1 AND 100),
    parameters TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(parameters)),
    enabled    INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TRIGGER models_changed_insert AFTER INSERT ON models
BEGIN UPDATE change_marker SET revision = revision + 1 WHERE id = 1; END;
CREATE TRIGGER models_changed_update AFTER UPDATE ON models
BEGIN UPDATE change_marker SET revision = revision + 1 WHERE id = 1; END;
CREATE TRIGGER models_changed_delete AFTER DELETE ON models
BEGIN UPDATE change_marker SET revision = revision + 1 WHERE id = 1; END;
INSERT INTO models (name, engine, parameters) VALUES ('local-ngram', 'local', '{"order": 3}');
CREATE TABLE schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL,
    applied_at REAL NOT NULL, applied_by_pid INTEGER NOT NULL);
INSERT INTO schema_migrations VALUES (1, 'models_and_change_marker', 1700000000.0, 42);
INSERT INTO schema_migrations VALUES (2, 'default_model', 1700000001.0, 42);
"""


def test_a_database_of_the_sql_file_migrator_is_adopted(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.executescript(_OLD_0001_0002)
        db.execute("INSERT INTO models (name, engine) VALUES ('mine', 'local')")
        db.commit()
    before = _query(database, "SELECT * FROM schema_migrations")
    status = schema_status(database)
    assert (status.current, status.latest) == (2, 3)  # where it stands, not "0"

    applied = apply_migrations(database)
    assert [m.version for m in applied] == [3]  # 0001 and 0002 are not run again
    assert _query(database, "SELECT version_num FROM alembic_version") == [("0003",)]
    assert _query(database, "SELECT * FROM schema_migrations") == before  # untouched
    # 0003 carried the marker over (the default model + 'mine' = 2 changes).
    assert _query(database, "SELECT table_name, revision FROM table_revisions") == [("models", 2)]
    assert sorted(r[0] for r in _query(database, "SELECT name FROM models")) == [
        "local-ngram",
        "mine",
    ]
    assert apply_migrations(database) == []


def test_an_up_to_date_adopted_database_is_stamped_once(tmp_path: Path) -> None:
    source = MigrationSource("service", tmp_path / "m")
    _script(source.directory, 1, "create", ["CREATE TABLE t (x INTEGER)"])
    database = tmp_path / "db.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.executescript(
            "CREATE TABLE t (x INTEGER);"
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at REAL NOT NULL, applied_by_pid INTEGER NOT NULL);"
            "INSERT INTO schema_migrations VALUES (1, 'create', 0, 1);"
        )
    assert not schema_status(database, sources=[source]).behind
    assert apply_migrations(database, sources=[source]) == []
    assert _query(database, "SELECT version_num FROM alembic_version") == [("0001",)]


# -- failures, sources ------------------------------------------------------------


def test_a_failing_revision_is_rolled_back_and_named(tmp_path: Path) -> None:
    source = MigrationSource("service", tmp_path / "m")
    _script(source.directory, 1, "create", ["CREATE TABLE t (x INTEGER)"])
    _script(
        source.directory,
        2,
        "broken",
        [
            "CREATE TABLE u (y INTEGER)",
            "ALTER TABLE t ADD COLUMN z TEXT",
            "CREATE INDEX t_x ON t (x)",
            "INSERT INTO missing VALUES (1)",
        ],
    )
    database = tmp_path / "db.sqlite"
    message = (
        "migration 0002_broken.py of 'service' failed and was rolled back: "
        "OperationalError: no such table: missing"
    )
    with pytest.raises(MigrationError) as raised:
        apply_migrations(database, sources=[source])
    assert str(raised.value) == message
    # 0001 stays; nothing of 0002's DDL is left behind.
    assert _tables(database) == {"alembic_version", "t"}
    assert _columns(database, "t") == ["x"]
    assert _query(database, "SELECT name FROM sqlite_master WHERE type='index'") == [
        ("sqlite_autoindex_alembic_version_1",)
    ]
    assert _query(database, "SELECT version_num FROM alembic_version") == [("0001",)]
    assert schema_status(database, sources=[source]).current == 1


def test_a_failing_first_revision_leaves_a_fresh_database_empty(tmp_path: Path) -> None:
    source = MigrationSource("service", tmp_path / "m")
    _script(source.directory, 1, "broken", ["CREATE TABLE t (x INTEGER)", "SELECT * FROM nope"])
    database = tmp_path / "db.sqlite"
    with pytest.raises(MigrationError, match=r"0001_broken\.py of 'service' failed"):
        apply_migrations(database, sources=[source])
    assert _tables(database) == set()
    assert schema_status(database, sources=[source]).current == 0


def test_two_sources_keep_separate_histories(tmp_path: Path) -> None:
    alpha = MigrationSource("team-alpha", tmp_path / "alpha")
    beta = MigrationSource("Team.Beta", tmp_path / "beta")
    assert (alpha.version_table, beta.version_table) == (
        "alembic_version_team_alpha",
        "alembic_version_team_beta",
    )
    _script(alpha.directory, 1, "create", ["CREATE TABLE alpha (x INTEGER)"], ["DROP TABLE alpha"])
    _script(
        alpha.directory,
        2,
        "more",
        ["ALTER TABLE alpha ADD COLUMN y TEXT"],
        ["ALTER TABLE alpha DROP COLUMN y"],
    )
    _script(beta.directory, 1, "create", ["CREATE TABLE beta (x INTEGER)"])
    database = tmp_path / "db.sqlite"
    sources = [SERVICE, alpha, beta]

    applied = apply_migrations(database, sources=sources)
    assert [(m.source, m.version) for m in applied] == [
        ("service", 1),
        ("service", 2),
        ("service", 3),
        ("team-alpha", 1),
        ("team-alpha", 2),
        ("Team.Beta", 1),
    ]
    assert _query(database, "SELECT version_num FROM alembic_version_team_alpha") == [("0002",)]
    assert _query(database, "SELECT version_num FROM alembic_version_team_beta") == [("0001",)]
    assert _query(database, "SELECT version_num FROM alembic_version") == [("0003",)]

    _script(beta.directory, 2, "more", ["ALTER TABLE beta ADD COLUMN y TEXT"])
    status = schema_status(database, sources=sources)
    assert status.sources == {"service": (3, 3), "team-alpha": (2, 2), "Team.Beta": (1, 2)}
    assert not status.behind  # the service is current
    assert status.pending == ["Team.Beta"]
    assert [(m.source, m.version) for m in apply_migrations(database, sources=sources)] == [
        ("Team.Beta", 2)
    ]
    # A downgrade of one source leaves the others where they are.
    assert [m.version for m in downgrade(database, 5.0, alpha, 0)] == [2, 1]
    status = schema_status(database, sources=sources)
    assert status.sources == {"service": (3, 3), "team-alpha": (0, 2), "Team.Beta": (2, 2)}
    assert "alpha" not in _tables(database)
    assert "beta" in _tables(database)


def test_a_failing_team_source_is_reported_and_the_others_still_apply(tmp_path: Path) -> None:
    bad = MigrationSource("team-example", tmp_path / "bad")
    good = MigrationSource("team-good", tmp_path / "good")
    _script(bad.directory, 1, "create", ["CREATE TABLE t (x INTEGER)"])
    _script(bad.directory, 2, "flags", ["ALTER TABLE t ADD COLUMN f INTEGER", "DELETE FROM x"])
    _script(good.directory, 1, "create", ["CREATE TABLE good (x INTEGER)"])
    database = tmp_path / "db.sqlite"
    failures: list[tuple[str, str]] = []

    applied = apply_migrations(
        database,
        sources=[SERVICE, bad, good],
        on_failure=lambda source, error: failures.append((source.name, str(error))),
    )
    assert failures == [
        (
            "team-example",
            "migration 0002_flags.py of 'team-example' failed and was rolled back: "
            "OperationalError: no such table: x",
        )
    ]
    assert [(m.source, m.version) for m in applied] == [
        ("service", 1),
        ("service", 2),
        ("service", 3),
        ("team-example", 1),
        ("team-good", 1),
    ]
    assert _columns(database, "t") == ["x"]
    status = schema_status(database, sources=[SERVICE, bad, good])
    assert status.sources == {"service": (3, 3), "team-example": (1, 2), "team-good": (1, 1)}

    # Without on_failure the team's failure raises.
    with pytest.raises(MigrationError, match=r"^migration 0002_flags\.py of 'team-example'"):
        apply_migrations(database, sources=[SERVICE, bad, good])


def test_a_malformed_team_folder_is_reported_and_a_failing_service_always_raises(
    tmp_path: Path,
) -> None:
    stray = MigrationSource("team-stray", tmp_path / "stray")
    _script(stray.directory, 1, "create", ["CREATE TABLE t (x INTEGER)"])
    (stray.directory / "notes.py").write_text("")
    failures: list[str] = []
    database = tmp_path / "db.sqlite"
    apply_migrations(
        database, sources=[SERVICE, stray], on_failure=lambda s, e: failures.append(s.name)
    )
    assert failures == ["team-stray"]
    assert schema_status(database).current == 3

    broken_service = MigrationSource("service", tmp_path / "svc")
    _script(broken_service.directory, 1, "broken", ["SELECT * FROM nope"])
    with pytest.raises(MigrationError, match="of 'service' failed"):
        apply_migrations(
            tmp_path / "other.sqlite", sources=[broken_service], on_failure=lambda s, e: None
        )


# -- the convention -----------------------------------------------------------------


def test_the_naming_and_numbering_convention_is_enforced(tmp_path: Path) -> None:
    def refused(folder: str, pattern: str) -> None:
        with pytest.raises(MigrationError, match=pattern):
            discover(tmp_path / folder, "team-x")

    _script(tmp_path / "stray", 1, "create", [])
    (tmp_path / "stray" / "1_more.py").write_text("")
    refused("stray", r"'1_more\.py' must be named NNNN_slug\.py")

    _script(tmp_path / "upper", 1, "Create", [])
    refused("upper", r"0001_Create\.py' must be named NNNN_slug\.py")

    _script(tmp_path / "dup", 1, "one", [])
    _script(tmp_path / "dup", 1, "two", [])
    refused("dup", r"two migration files have number 1: 0001_one\.py and 0001_two\.py")

    _script(tmp_path / "gap", 1, "one", [])
    _script(tmp_path / "gap", 3, "three", [])
    refused("gap", r"without a gap: 0003_three\.py where 0002 was expected")

    _script(tmp_path / "rev", 1, "one", [])
    _script(tmp_path / "rev", 2, "two", [], revision='"abc123"')
    refused("rev", r"0002_two\.py says revision = \"abc123\"; expected revision = \"0002\"")

    _script(tmp_path / "down", 1, "one", [])
    _script(tmp_path / "down", 2, "two", [], down_revision='"0000"')
    refused(
        "down", r"0002_two\.py says down_revision = \"0000\"; expected down_revision = \"0001\""
    )

    _script(tmp_path / "first", 1, "one", [], down_revision='"0000"')
    refused("first", r"expected down_revision = None")

    (tmp_path / "missing_rev").mkdir()
    (tmp_path / "missing_rev" / "0001_one.py").write_text("down_revision = None\n")
    refused("missing_rev", r"0001_one\.py must assign revision exactly once")

    _script(tmp_path / "sql", 1, "one", [])
    (tmp_path / "sql" / "0002_two.sql").write_text("SELECT 1;")
    refused("sql", r"SQL files are no longer applied; rewrite 0002_two\.sql")

    refused("nowhere", r"migration folder .*nowhere' of 'team-x' does not exist")


def test_the_convention_accepts_annotations_comments_and_a_package_marker(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "m"
    _script(folder, 1, "one", [], down_revision="None  # the first")
    _script(folder, 2, "two_words", [], revision="'0002'")
    text = (folder / "0002_two_words.py").read_text()
    (folder / "0002_two_words.py").write_text(
        text.replace('down_revision = "0001"', 'down_revision: str | None = "0001"')
    )
    (folder / "__init__.py").write_text("")
    (folder / "README.md").write_text("notes")
    (folder / "__pycache__").mkdir()
    assert [(m.version, m.name) for m in discover(folder)] == [(1, "one"), (2, "two_words")]
    database = tmp_path / "db.sqlite"
    source = MigrationSource("team-x", folder)
    assert [m.version for m in apply_migrations(database, sources=[source])] == [1, 2]


def test_sources_need_distinct_names_and_version_tables(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="distinct names and version tables"):
        schema_status(
            tmp_path / "db.sqlite",
            sources=[MigrationSource("team-a", tmp_path), MigrationSource("team_a", tmp_path)],
        )


# -- the lock, the cheap path, concurrency ----------------------------------------------


def test_the_migration_lock_is_released_on_return_and_not_re_entrant(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite"
    with migration_lock(database), pytest.raises(MigrationError, match="not re-entrant"):
        apply_migrations(database)  # would deadlock on its own flock otherwise
    assert len(apply_migrations(database)) == 3
    with migration_lock(database):  # apply released it
        pass


_PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from quart_service.data.migrations import apply_migrations, schema_status
    database = Path(sys.argv[1])
    status = schema_status(database)
    applied = apply_migrations(database)
    heavy = sorted(m for m in ("alembic", "sqlalchemy") if m in sys.modules)
    print(status.current, len(applied), ",".join(heavy) or "-")
    """
)


def _probe(database: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(database)],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return done.stdout.strip()


def test_an_up_to_date_database_costs_no_alembic_import(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite"
    # The probe sees the import when there is work (so it would see it below too).
    assert _probe(database) == "0 3 alembic,sqlalchemy"
    assert _probe(database) == "3 0 -"


def _apply_in_child(database: str, directory: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    team = MigrationSource("team-count", Path(directory))
    applied = apply_migrations(Path(database), sources=[SERVICE, team])
    results.put([(m.source, m.version) for m in applied])


def test_concurrent_appliers_apply_each_revision_exactly_once(tmp_path: Path) -> None:
    team = tmp_path / "team"
    _script(
        team, 1, "runs", ["CREATE TABLE runs (revision TEXT)", "INSERT INTO runs VALUES ('0001')"]
    )
    _script(team, 2, "two", ["INSERT INTO runs VALUES ('0002')"])
    _script(team, 3, "three", ["INSERT INTO runs VALUES ('0003')"])
    database = tmp_path / "db.sqlite"
    context = multiprocessing.get_context("spawn")  # four cold processes, like workers
    barrier, results = context.Barrier(4), context.Queue()
    children = [
        context.Process(target=_apply_in_child, args=(str(database), str(team), barrier, results))
        for _ in range(4)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    applied = sorted(item for outcome in outcomes for item in outcome)
    assert applied == [("service", 1), ("service", 2), ("service", 3)] + [
        ("team-count", n) for n in (1, 2, 3)
    ]
    assert sum(1 for outcome in outcomes if outcome) == 1  # one applier did all of it
    assert _query(database, "SELECT revision FROM runs ORDER BY revision") == [
        ("0001",),
        ("0002",),
        ("0003",),
    ]


# -- the CLI ------------------------------------------------------------------------------


def test_the_migrate_command_applies_reports_and_moves_a_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUART_SERVICE_DATA_DIR", str(tmp_path / "data"))
    database = tmp_path / "data" / "quart_service.db"
    runner = CliRunner()

    status = runner.invoke(main, ["migrate", "--status"])
    assert status.exit_code == 0, status.output
    assert status.output == f"{database}: service schema at version 0 (latest 3)\n"
    assert not database.exists()

    applied = runner.invoke(main, ["migrate"])
    assert applied.exit_code == 0, applied.output
    assert applied.output.splitlines() == [
        "applied 0001_models_and_change_marker.py (service)",
        "applied 0002_default_model.py (service)",
        "applied 0003_table_revisions.py (service)",
        f"{database}: service schema at version 3 (latest 3)",
    ]

    down = runner.invoke(main, ["migrate", "--to", "1", "--source", "service"])
    assert down.exit_code == 0, down.output
    assert down.output.splitlines() == [
        "reverted 0003_table_revisions.py (service)",
        "reverted 0002_default_model.py (service)",
        f"{database}: service schema at version 1 (latest 3)",
    ]
    up = runner.invoke(main, ["migrate", "--to", "2"])
    assert up.output.splitlines()[0] == "applied 0002_default_model.py (service)"

    unknown = runner.invoke(main, ["migrate", "--to", "1", "--source", "team-x"])
    assert unknown.exit_code == 2
    assert "no migration source 'team-x' (known: service)" in unknown.output
    too_far = runner.invoke(main, ["migrate", "--to", "7"])
    assert too_far.exit_code == 1
    assert "'service' has versions 0 to 3; cannot go to 7" in too_far.output
    both = runner.invoke(main, ["migrate", "--status", "--to", "1"])
    assert both.exit_code == 2
