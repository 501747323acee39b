"""The team's prompt templates: a table the team owns, read as a dataset.

Revision ids follow the file numbers (a linear history per team).
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


# The same text timestamp on either database the service may use (SQLite's strftime,
# PostgreSQL's to_char): branch on the dialect where the SQL differs.
_NOW = {
    "sqlite": "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
    "postgresql": "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
}


def upgrade() -> None:
    now = _NOW[op.get_bind().dialect.name]
    op.execute(
        f"""
        CREATE TABLE team_prompts (
            name       TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 100),
            template   TEXT NOT NULL,
            updated_at TEXT NOT NULL DEFAULT {now}
        )
        """
    )
    op.execute("INSERT INTO team_prompts (name, template) VALUES ('greeting', 'Hello, $who!')")


def downgrade() -> None:
    op.execute("DROP TABLE team_prompts")
