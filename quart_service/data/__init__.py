"""The data plane: SQLite, migrations, the leader's refresh, snapshots and the cache."""

from ..errors import MigrationError
from .cache import ServiceCache
from .database import Database
from .layer import DataLayer
from .migrations import apply_migrations, schema_status
from .models import ModelConfig, ModelRepository
from .snapshot import Snapshot

__all__ = [
    "DataLayer",
    "Database",
    "MigrationError",
    "ModelConfig",
    "ModelRepository",
    "ServiceCache",
    "Snapshot",
    "apply_migrations",
    "schema_status",
]
