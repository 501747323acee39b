"""The app for the Hypercorn CLI: ``hypercorn --config hypercorn.toml quart_service.app:app``.

Every spawned worker imports this module. It reads the settings from the environment
and opens nothing. Bad settings stop the worker with one clear line naming the key
(exit code 2) rather than a traceback. Not imported by ``quart_service`` itself.
"""

from __future__ import annotations

import sys

from .errors import ServiceError, SettingsError
from .factory import create_app

try:
    app = create_app()
except ServiceError as exc:  # bad settings, a broken or colliding team blueprint
    kind = "bad settings" if isinstance(exc, SettingsError) else "cannot start"
    print(f"quart_service: {kind}: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None

__all__ = ["app"]
