"""Engines: what turns a prompt into text. Built in: ``local`` and ``upstream``."""

from .base import Engine, EngineContext, EngineError, EngineFactory, GenerationRequest, Message
from .registry import ENTRY_POINT_GROUP, EngineRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "Engine",
    "EngineContext",
    "EngineError",
    "EngineFactory",
    "EngineRegistry",
    "GenerationRequest",
    "Message",
]
