"""The data plane: the database (SQLite, or PostgreSQL), migrations, datasets and their
refresh, snapshots, the cache."""

from ..errors import MigrationError
from .cache import ServiceCache
from .database import Database
from .datasets import Dataset
from .layer import DataLayer
from .migrations import apply_migrations, schema_status
from .models import MODELS, ModelConfig, ModelRepository
from .published import DatasetView
from .snapshot import Snapshot

__all__ = [
    "MODELS",
    "DataLayer",
    "Database",
    "Dataset",
    "DatasetView",
    "MigrationError",
    "ModelConfig",
    "ModelRepository",
    "ServiceCache",
    "Snapshot",
    "apply_migrations",
    "schema_status",
]
