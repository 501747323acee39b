"""The team's prompt templates: a table the team owns, read as a dataset.

Revision ids follow the file numbers (a linear history per team).
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE team_prompts (
            name       TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 100),
            template   TEXT NOT NULL,
            updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        )
        """
    )
    op.execute("INSERT INTO team_prompts (name, template) VALUES ('greeting', 'Hello, $who!')")


def downgrade() -> None:
    op.execute("DROP TABLE team_prompts")
