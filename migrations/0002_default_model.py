"""A model that works out of the box: the built-in n-gram engine on its bundled corpus."""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.execute(
        """
        INSERT INTO models (name, engine, parameters)
        VALUES ('local-ngram', 'local', '{"order": 3}')
        """
    )


def downgrade() -> None:
    op.execute("DELETE FROM models WHERE name = 'local-ngram'")
