"""Engines: what turns a prompt into text. Built in: ``local`` and ``upstream``."""

from ..errors import EngineError
from .base import (
    Candidate,
    Embedder,
    Engine,
    EngineContext,
    EngineFactory,
    GenerationRequest,
    Message,
    Proxy,
    ProxyReply,
    Token,
    TokenEngine,
)
from .host import EngineHost
from .registry import ENTRY_POINT_GROUP, EngineRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "Candidate",
    "Embedder",
    "Engine",
    "EngineContext",
    "EngineError",
    "EngineFactory",
    "EngineHost",
    "EngineRegistry",
    "GenerationRequest",
    "Message",
    "Proxy",
    "ProxyReply",
    "Token",
    "TokenEngine",
]
