"""quart_service: an async streaming web service for AI workloads on Quart and Hypercorn.

The public surface is what ``__all__`` lists; everything in ``_``-prefixed modules is
private. See docs/ for the tutorial, guides and reference.
"""

from ._version import __version__
from .cache import ServiceCache
from .data import ModelConfig, Snapshot
from .errors import (
    Conflict,
    InvalidParameter,
    NotFound,
    Overloaded,
    ResourceUnavailable,
    ServiceError,
    SettingsError,
    Unauthorized,
)
from .executor import BoundedExecutor, ExecutorStats
from .factory import create_app
from .observe import current_request_id
from .plugins import Plugin, PluginError
from .resources import Resource, ResourceRegistry, ResourceState, ResourceStatus
from .service import (
    Service,
    cache,
    cached,
    current_service,
    database,
    resources,
    settings,
    snapshot,
)
from .settings import Settings
from .streaming import NDJSON, SSE, ServerSentEvent, ndjson, sse, stream_response

__all__ = [
    "NDJSON",
    "SSE",
    "BoundedExecutor",
    "Conflict",
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
    "Service",
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
    "current_service",
    "database",
    "ndjson",
    "resources",
    "settings",
    "snapshot",
    "sse",
    "stream_response",
]
