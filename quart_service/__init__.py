"""quart_service: an async streaming web service for AI workloads on Quart and Hypercorn.

The public surface is what ``__all__`` lists (a test checks it both ways). See docs/
for the tutorial, guides and reference, and docs/design.md for how the parts fit.
"""

from ._version import __version__
from .config import Settings
from .context import cache, cached, database, dataset, resources, settings, snapshot
from .data import Database, Dataset, DatasetView, ModelConfig, ServiceCache, Snapshot
from .errors import (
    Conflict,
    DatasetUnavailable,
    InvalidParameter,
    NotFound,
    Overloaded,
    PluginError,
    ResourceUnavailable,
    ServiceError,
    SettingsError,
    Unauthorized,
)
from .executor import BoundedExecutor, ExecutorStats
from .factory import create_app
from .observability import current_request_id
from .plugins import Plugin
from .singletons import Resource, ResourceRegistry, ResourceState, ResourceStatus
from .streaming import NDJSON, SSE, ServerSentEvent, ndjson, sse, stream_response

__all__ = [
    "NDJSON",
    "SSE",
    "BoundedExecutor",
    "Conflict",
    "Database",
    "Dataset",
    "DatasetUnavailable",
    "DatasetView",
    "ExecutorStats",
    "InvalidParameter",
    "ModelConfig",
    "NotFound",
    "Overloaded",
    "Plugin",
    "PluginError",
    "Resource",
    "ResourceRegistry",
    "ResourceState",
    "ResourceStatus",
    "ResourceUnavailable",
    "ServerSentEvent",
    "ServiceCache",
    "ServiceError",
    "Settings",
    "SettingsError",
    "Snapshot",
    "Unauthorized",
    "__version__",
    "cache",
    "cached",
    "create_app",
    "current_request_id",
    "database",
    "dataset",
    "ndjson",
    "resources",
    "settings",
    "snapshot",
    "sse",
    "stream_response",
]
