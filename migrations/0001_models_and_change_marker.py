"""The data that worker singletons load, and the change marker that says it moved.

change_marker.revision is bumped by triggers on every insert, update and delete of
a refreshable table, so a change made by any writer (another service, the sqlite3
shell) is seen by the leader's one-row poll.

On PostgreSQL the same tables, with PostgreSQL's spellings: a JSON check by cast, the
timestamps from now() as the same text, and one statement-level trigger calling a
plpgsql function.
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision: str | None = None

_TRIGGER = """
CREATE TRIGGER models_changed_{event} AFTER {EVENT} ON models
BEGIN
    UPDATE change_marker SET revision = revision + 1 WHERE id = 1;
END
"""


# The text form of the timestamps, as SQLite's strftime('%Y-%m-%dT%H:%M:%fZ', 'now') writes it.
PG_NOW = "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

_PG_FUNCTION = """
CREATE FUNCTION qs_bump_change_marker() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE change_marker SET revision = revision + 1 WHERE id = 1;
    RETURN NULL;
END
$$
"""


def _postgres() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE change_marker (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            revision INTEGER NOT NULL
        )
        """
    )
    op.execute("INSERT INTO change_marker (id, revision) VALUES (1, 0)")
    if _postgres():
        op.execute(
            f"""
            CREATE TABLE models (
                name       TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
                engine     TEXT NOT NULL CHECK (length(engine) BETWEEN 1 AND 100),
                parameters TEXT NOT NULL DEFAULT '{{}}' CHECK (parameters::json IS NOT NULL),
                enabled    INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
                created_at TEXT NOT NULL DEFAULT {PG_NOW},
                updated_at TEXT NOT NULL DEFAULT {PG_NOW}
            )
            """
        )
        op.execute(_PG_FUNCTION)
        op.execute(
            "CREATE TRIGGER models_changed AFTER INSERT OR UPDATE OR DELETE ON models "
            "FOR EACH STATEMENT EXECUTE FUNCTION qs_bump_change_marker()"
        )
        return
    op.execute(
        """
        CREATE TABLE models (
            name       TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
            engine     TEXT NOT NULL CHECK (length(engine) BETWEEN 1 AND 100),
            parameters TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(parameters)),
            enabled    INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        )
        """
    )
    for event in ("insert", "update", "delete"):
        op.execute(_TRIGGER.format(event=event, EVENT=event.upper()))


def downgrade() -> None:
    if _postgres():
        op.execute("DROP TABLE models")  # its trigger goes with it
        op.execute("DROP FUNCTION qs_bump_change_marker()")
        op.execute("DROP TABLE change_marker")
        return
    for event in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER models_changed_{event}")
    op.execute("DROP TABLE models")
    op.execute("DROP TABLE change_marker")
