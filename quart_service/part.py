"""What every part of a worker is: started once, stopped once, and able to say how it is.

The process container (:class:`~quart_service.service.Service`) holds the parts of a
worker — the pool, the resources, the streams, the data, the engines, the plugins,
the request observer, the drain — starts them in order when the worker starts
serving, and stops them in reverse. ``/readyz`` and ``/debug/identity`` ask each part
for its own answer instead of reaching into its internals.

Views reach a part through ``app.extensions`` under :func:`extension_key`; the
accessors in :mod:`quart_service.context` do that for application and team code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from quart import current_app

from .observability.metrics import Metrics
from .observability.proc import rss_bytes, thread_count

__all__ = [
    "METRICS_KEY",
    "PARTS_KEY",
    "Part",
    "Readiness",
    "current_metrics",
    "current_part",
    "current_parts",
    "extension_key",
    "identity_of",
    "readiness_of",
]

# Where the container puts the tuple of every part (in start order) and, once the
# worker serves, its metrics.
PARTS_KEY = "quart_service.parts"
METRICS_KEY = "quart_service.metrics"


@dataclass(slots=True)
class Readiness:
    """A part's answer to ``/readyz``: facts to show, and problems (not ready)."""

    checks: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Part(Protocol):
    """A subsystem of one worker process."""

    @property
    def name(self) -> str:
        """Its key on ``/debug/identity`` and ``/readyz``."""
        ...

    async def start(self, metrics: Metrics) -> None:
        """Create what this process needs (pools, connections), counting into ``metrics``."""
        ...

    async def stop(self) -> None:
        """Release it (called once, in reverse start order)."""
        ...

    async def readiness(self) -> Readiness:
        """Whether this part lets the worker take traffic, and why not."""
        ...

    def identity(self) -> Any:
        """What this worker's part is and has done (JSON-ready)."""
        ...


def extension_key(name: str) -> str:
    """The ``app.extensions`` key of the part called ``name``."""
    return f"quart_service.{name}"


def current_part(name: str) -> Any:
    """The part called ``name`` of the app handling the current request."""
    return current_app.extensions[extension_key(name)]


def current_parts() -> Sequence[Part]:
    """Every part of the app handling the current request, in start order."""
    parts: Sequence[Part] = current_app.extensions[PARTS_KEY]
    return parts


def current_metrics() -> Metrics | None:
    """This worker's metrics (None before it serves)."""
    metrics: Metrics | None = current_app.extensions.get(METRICS_KEY)
    return metrics


async def readiness_of(parts: Sequence[Part]) -> Readiness:
    """Every part's checks under its name, and all of their problems."""
    ready = Readiness()
    for part in parts:
        answer = await part.readiness()
        if answer.checks:
            ready.checks[part.name] = answer.checks
        ready.problems.extend(answer.problems)
    return ready


def identity_of(parts: Sequence[Part]) -> dict[str, Any]:
    """Who this process is, and every part's own account under its name."""
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "threads": thread_count(),
        "rss_bytes": rss_bytes(),
        **{part.name: part.identity() for part in parts},
    }
