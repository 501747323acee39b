"""Streaming responses (SSE, NDJSON) from async generators and sync iterators."""

from .body import StreamCounts, StreamHub, StreamPolicy
from .events import NDJSON, SSE, Encoder, ServerSentEvent
from .responses import ndjson, sse, stream_response

__all__ = [
    "NDJSON",
    "SSE",
    "Encoder",
    "ServerSentEvent",
    "StreamCounts",
    "StreamHub",
    "StreamPolicy",
    "ndjson",
    "sse",
    "stream_response",
]
