"""The entry point's factory: imports the engine (and numpy) only when a model uses it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ...errors import EngineError

if TYPE_CHECKING:
    from ...data.models import ModelConfig
    from ..base import Engine, EngineContext

__all__ = ["create"]


async def create(model: ModelConfig, context: EngineContext) -> Engine:
    """Build the engine for ``model`` (entry point ``neural``); see :mod:`.engine`."""
    try:
        # Imported on the pool: importing numpy takes a few hundred milliseconds that
        # the event loop (every other request of the worker) would otherwise wait.
        engine = await context.run_sync(importlib.import_module, f"{__package__}.engine")
    except ModuleNotFoundError as exc:
        if exc.name != "numpy":
            raise
        raise EngineError(
            "the 'neural' engine needs numpy: pip install 'quart_service[neural]'"
        ) from exc
    built: Engine = await engine.create(model, context)
    return built
