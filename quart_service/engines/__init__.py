"""Engines: what turns a prompt into text. Built in: ``local`` and ``upstream``."""

from ..errors import EngineError
from .base import Embedder, Engine, EngineContext, EngineFactory, GenerationRequest, Message
from .host import EngineHost
from .registry import ENTRY_POINT_GROUP, EngineRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "Embedder",
    "Engine",
    "EngineContext",
    "EngineError",
    "EngineFactory",
    "EngineHost",
    "EngineRegistry",
    "GenerationRequest",
    "Message",
]
