"""A team migration that fails half-way: its first statement works, its second does not."""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE broken_team_notes (id INTEGER PRIMARY KEY)")
    op.execute("INSERT INTO no_such_table VALUES (1)")


def downgrade() -> None:
    op.execute("DROP TABLE broken_team_notes")
