"""One revision marker per watched table, instead of one for the whole database.

table_revisions holds a row per table that a dataset reads; triggers on that table
add one to its row on every insert, update and delete. The refresh leader reads
all rows in one statement and reloads only the datasets whose tables moved. The
service installs the row and triggers for every table a declared dataset names
(quart_service/data/markers.py); this migration moves the models table over.

On PostgreSQL one plpgsql function, qs_bump_revision(), bumps the row of the table
it fires on (TG_TABLE_NAME), and each watched table has one statement-level trigger
qs_revision_<table> (AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ... FOR EACH
STATEMENT) calling it.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"

_EVENTS = ("insert", "update", "delete")

# The names are fixed: quart_service/data/markers.py finds the triggers by them.
_REVISION_TRIGGER = """
CREATE TRIGGER qs_revision_models_{event} AFTER {EVENT} ON models
BEGIN
    UPDATE table_revisions SET revision = revision + 1 WHERE table_name = 'models';
END
"""

_CHANGED_TRIGGER = """
CREATE TRIGGER models_changed_{event} AFTER {EVENT} ON models
BEGIN
    UPDATE change_marker SET revision = revision + 1 WHERE id = 1;
END
"""


# Kept in step with quart_service/data/markers.py (which may install it too).
PG_BUMP_FUNCTION = """
CREATE OR REPLACE FUNCTION qs_bump_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE table_revisions SET revision = revision + 1 WHERE table_name = TG_TABLE_NAME;
    RETURN NULL;
END
$$
"""

_PG_CHANGED_FUNCTION = """
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
        CREATE TABLE table_revisions (
            table_name TEXT PRIMARY KEY,
            revision   INTEGER NOT NULL DEFAULT 0
        )
        """
    )
    op.execute(
        """
        INSERT INTO table_revisions (table_name, revision)
        SELECT 'models', revision FROM change_marker WHERE id = 1
        """
    )
    if _postgres():
        op.execute("DROP TRIGGER models_changed ON models")
        op.execute("DROP FUNCTION qs_bump_change_marker()")
        op.execute("DROP TABLE change_marker")
        op.execute(PG_BUMP_FUNCTION)
        op.execute(
            "CREATE TRIGGER qs_revision_models AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
            "ON models FOR EACH STATEMENT EXECUTE FUNCTION qs_bump_revision()"
        )
        return
    for event in _EVENTS:
        op.execute(f"DROP TRIGGER models_changed_{event}")
    op.execute("DROP TABLE change_marker")
    for event in _EVENTS:
        op.execute(_REVISION_TRIGGER.format(event=event, EVENT=event.upper()))


def downgrade() -> None:
    # Every qs_revision_* trigger writes to table_revisions, including those that
    # markers.py installed for the tables of declared datasets: drop them all, or each
    # write to those tables would fail once the table is gone.
    postgres = _postgres()
    if postgres:
        # '%%': a single '%' whether or not the driver substitutes parameters.
        triggers = op.get_bind().exec_driver_sql(
            "SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE NOT t.tgisinternal AND t.tgname LIKE 'qs\\_revision\\_%%'"
        )
        for name, table in triggers.fetchall():
            op.execute(f'DROP TRIGGER "{name}" ON "{table}"')
        op.execute("DROP FUNCTION qs_bump_revision()")
    else:
        triggers = op.get_bind().exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'trigger'"
            " AND name LIKE 'qs\\_revision\\_%' ESCAPE '\\'"
        )
        for (name,) in triggers.fetchall():
            op.execute(f'DROP TRIGGER "{name}"')
    op.execute(
        """
        CREATE TABLE change_marker (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            revision INTEGER NOT NULL
        )
        """
    )
    op.execute(
        """
        INSERT INTO change_marker (id, revision)
        SELECT 1, coalesce(
            (SELECT revision FROM table_revisions WHERE table_name = 'models'), 0
        )
        """
    )
    op.execute("DROP TABLE table_revisions")
    if postgres:
        op.execute(_PG_CHANGED_FUNCTION)
        op.execute(
            "CREATE TRIGGER models_changed AFTER INSERT OR UPDATE OR DELETE ON models "
            "FOR EACH STATEMENT EXECUTE FUNCTION qs_bump_change_marker()"
        )
    else:
        for event in _EVENTS:
            op.execute(_CHANGED_TRIGGER.format(event=event, EVENT=event.upper()))
