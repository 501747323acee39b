"""The entry point's factory: imports the engine (and numpy) only when a model uses it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import EngineError
from ..parameters import parameters
from .parameters import NeuralParameters

if TYPE_CHECKING:
    from ...data.models import ModelConfig
    from ..base import Engine, EngineContext

__all__ = ["create"]


@parameters(NeuralParameters)
async def create(model: ModelConfig, context: EngineContext) -> Engine:
    """Build the engine for ``model`` (entry point ``neural``); see :mod:`.engine`."""
    try:
        from .engine import create as create_engine
    except ModuleNotFoundError as exc:
        if exc.name != "numpy":
            raise
        raise EngineError(
            "the 'neural' engine needs numpy: pip install 'quart_service[neural]'"
        ) from exc
    return await create_engine(model, context)
