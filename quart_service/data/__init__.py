"""The data plane: SQLite, migrations, the leader's refresh and the snapshot."""

from .database import Database
from .migrations import MigrationError, apply_migrations, schema_status
from .snapshot import ModelConfig, Snapshot

__all__ = [
    "Database",
    "MigrationError",
    "ModelConfig",
    "Snapshot",
    "apply_migrations",
    "schema_status",
]
