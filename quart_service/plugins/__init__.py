"""Team code: blueprints from entry points, and mounted WSGI (Flask) apps."""

from .loader import ENTRY_POINT_GROUP, LoadedPlugins, Plugin, import_string, load_plugins
from .wsgi import WSGIMounts

__all__ = [
    "ENTRY_POINT_GROUP",
    "LoadedPlugins",
    "Plugin",
    "WSGIMounts",
    "import_string",
    "load_plugins",
]
