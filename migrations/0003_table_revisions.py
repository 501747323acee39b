"""One revision marker per watched table, instead of one for the whole database.

table_revisions holds a row per table that a dataset reads; triggers on that table
add one to its row on every insert, update and delete. The refresh leader reads
all rows in one statement and reloads only the datasets whose tables moved. The
service installs the row and triggers for every table a declared dataset names
(quart_service/data/markers.py); this migration moves the models table over.
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
    for event in _EVENTS:
        op.execute(f"DROP TRIGGER models_changed_{event}")
    op.execute("DROP TABLE change_marker")
    for event in _EVENTS:
        op.execute(_REVISION_TRIGGER.format(event=event, EVENT=event.upper()))


def downgrade() -> None:
    # Every qs_revision_* trigger writes to table_revisions, including those that
    # markers.py installed for the tables of declared datasets: drop them all, or each
    # write to those tables would fail once the table is gone.
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
    for event in _EVENTS:
        op.execute(_CHANGED_TRIGGER.format(event=event, EVENT=event.upper()))
