"""This process's singletons: declared once, created lazily, exactly once, closed in order.

A :class:`Resource` is a declaration (a name, an async factory, an optional close); it
opens nothing and can live at module level. Each worker process has one
:class:`ResourceRegistry`, built at start-up, that holds the instances::

    MODEL = Resource("model", load_model, close=unload_model, required=True, limit=2)

    app = create_app(resources=[MODEL])

    @app.get("/predict")
    async def predict() -> dict[str, float]:
        model = await resources().get(MODEL)          # created on first use, once
        score = await resources().run_sync(MODEL, model.predict, 1.0)  # at most 2 at once
        return {"score": score}

A burst of first requests waits on one asyncio lock per resource, so the factory runs
once. A factory that raises leaves the resource ``failed``; the next use tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from contextvars import copy_context
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, ParamSpec, TypeVar, cast

from .errors import Overloaded, ResourceUnavailable
from .metrics.families import process_metrics

__all__ = ["Resource", "ResourceRegistry", "ResourceState", "ResourceStatus"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

log = logging.getLogger("quart_service.resources")


class ResourceState(enum.StrEnum):
    """Where a resource is in its life in this process."""

    NOT_CREATED = "not_created"
    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True, eq=False)
class Resource(Generic[T]):
    """The declaration of a per-process singleton; holds no instance.

    ``factory`` is awaited once per process on first use (or at start-up when warmed).
    ``close`` is awaited at shutdown, in reverse creation order. ``required`` makes
    ``/readyz`` depend on it. ``limit`` caps how many calls may use it at once through
    :meth:`ResourceRegistry.run_sync` / :meth:`ResourceRegistry.slot`.
    """

    name: str
    factory: Callable[[], Awaitable[T]]
    close: Callable[[T], Awaitable[None]] | None = None
    required: bool = False
    limit: int | None = None
    warm: bool = False


@dataclass(frozen=True, slots=True)
class ResourceStatus:
    """What the identity endpoint and ``/readyz`` say of one resource."""

    name: str
    state: ResourceState
    required: bool
    instance_id: str | None
    created_at: float | None
    error: str | None
    in_use: int
    limit: int | None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "name": self.name,
            "state": self.state.value,
            "required": self.required,
            "instance_id": self.instance_id,
            "created_at": self.created_at,
            "error": self.error,
            "in_use": self.in_use,
            "limit": self.limit,
        }


@dataclass(slots=True, eq=False)
class _Slot:
    """The per-process state of one resource."""

    spec: Resource[Any]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: ResourceState = ResourceState.NOT_CREATED
    value: Any = None
    instance_id: str | None = None
    created_at: float | None = None
    error: str | None = None
    semaphore: asyncio.Semaphore | None = None
    in_use: int = 0
    waiting: int = 0

    def is_ready(self) -> bool:
        return self.state is ResourceState.READY


class ResourceRegistry:
    """Holds this process's resource instances; one per worker, made at start-up."""

    def __init__(self, specs: Iterable[Resource[Any]] = (), *, max_waiting: int = 64) -> None:
        self._slots: dict[str, _Slot] = {}
        self._order: list[_Slot] = []  # creation order, closed in reverse
        self._max_waiting = max_waiting
        for spec in specs:
            self.declare(spec)

    def declare(self, spec: Resource[T]) -> Resource[T]:
        """Add a declaration; a second one under the same name is refused."""
        if spec.name in self._slots:
            raise ValueError(f"resource {spec.name!r} is declared twice")
        if spec.limit is not None and spec.limit < 1:
            raise ValueError(f"resource {spec.name!r}: limit must be >= 1, got {spec.limit}")
        slot = _Slot(spec)
        if spec.limit is not None:
            slot.semaphore = asyncio.Semaphore(spec.limit)
        self._slots[spec.name] = slot
        return spec

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def names(self) -> list[str]:
        """The declared names, in declaration order."""
        return list(self._slots)

    async def get(self, spec: Resource[T] | str) -> T:
        """This process's instance, created on first use (once, even under a burst)."""
        slot = self._slot(spec)
        if slot.state is ResourceState.READY:  # the fast path takes no lock
            return cast(T, slot.value)
        async with slot.lock:
            # Another task may have created it while this one waited for the lock.
            if slot.is_ready():
                return cast(T, slot.value)
            if slot.state is ResourceState.CLOSED:
                raise ResourceUnavailable(f"resource {slot.spec.name!r} is closed (shutting down)")
            slot.state = ResourceState.CREATING
            try:
                value = await slot.spec.factory()
            except Exception as exc:
                slot.state = ResourceState.FAILED
                slot.error = f"{type(exc).__name__}: {exc}"
                log.warning("resource %r failed to initialise: %s", slot.spec.name, slot.error)
                raise ResourceUnavailable(
                    f"resource {slot.spec.name!r} could not be created ({slot.error}); "
                    "it is retried on the next request"
                ) from exc
            except BaseException:
                # Cancelled while creating: nothing was made; the next use retries.
                slot.state = ResourceState.NOT_CREATED
                raise
            slot.value = value
            slot.instance_id = uuid.uuid4().hex[:12]
            slot.created_at = time.time()
            slot.error = None
            slot.state = ResourceState.READY
            self._order.append(slot)
            log.info("resource %r ready (instance %s)", slot.spec.name, slot.instance_id)
            return cast(T, value)

    async def warm(self, *, only_marked: bool = True) -> None:
        """Create resources now: those declared ``warm=True``, or all of them."""
        for slot in list(self._slots.values()):
            if slot.spec.warm or not only_marked:
                # A failure is reported by state and /readyz and retried on next use.
                with contextlib.suppress(ResourceUnavailable):
                    await self.get(slot.spec)

    @asynccontextmanager
    async def slot(self, spec: Resource[Any] | str) -> AsyncIterator[None]:
        """Hold one of the resource's concurrency places (no-op without a limit).

        When ``max_waiting`` callers already wait, the next is refused with
        :class:`Overloaded` instead of waiting without bound.
        """
        slot = self._slot(spec)
        semaphore = slot.semaphore
        if semaphore is None:
            slot.in_use += 1
            try:
                yield
            finally:
                slot.in_use -= 1
            return
        if semaphore.locked() and slot.waiting >= self._max_waiting:
            process_metrics().shed.labels("resource_busy").inc()
            raise Overloaded(
                f"resource {slot.spec.name!r} is at its limit of {slot.spec.limit} "
                f"concurrent uses with {slot.waiting} waiting; retry shortly.",
                retry_after=1.0,
            )
        slot.waiting += 1
        try:
            await semaphore.acquire()
        finally:
            slot.waiting -= 1
        slot.in_use += 1
        try:
            yield
        finally:
            slot.in_use -= 1
            semaphore.release()

    async def run_sync(
        self, spec: Resource[Any] | str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Run blocking ``fn`` on the shared pool, within the resource's limit."""
        async with self.slot(spec):
            loop = asyncio.get_running_loop()
            call = partial(copy_context().run, partial(fn, *args, **kwargs))
            return await loop.run_in_executor(None, call)

    async def reset(self, spec: Resource[Any] | str) -> None:
        """Close this process's instance (if any); the next use creates a new one.

        For a resource found broken (a connection to a file that was replaced)."""
        slot = self._slot(spec)
        async with slot.lock:
            if slot.state is not ResourceState.READY:
                return
            value, slot.value = slot.value, None
            slot.state, slot.instance_id = ResourceState.NOT_CREATED, None
            self._order.remove(slot)
            if slot.spec.close is not None:
                try:
                    await slot.spec.close(value)
                except Exception:
                    log.exception("closing resource %r failed", slot.spec.name)

    def status(self) -> list[ResourceStatus]:
        """Every resource's state, in declaration order."""
        return [
            ResourceStatus(
                name=s.spec.name,
                state=s.state,
                required=s.spec.required,
                instance_id=s.instance_id,
                created_at=s.created_at,
                error=s.error,
                in_use=s.in_use,
                limit=s.spec.limit,
            )
            for s in self._slots.values()
        ]

    async def aclose(self) -> None:
        """Close every created instance in reverse creation order; errors are logged."""
        while self._order:
            slot = self._order.pop()
            async with slot.lock:
                value, slot.value = slot.value, None
                slot.state = ResourceState.CLOSED
                if slot.spec.close is not None:
                    try:
                        await slot.spec.close(value)
                    except Exception:
                        log.exception("closing resource %r failed", slot.spec.name)
        for slot in self._slots.values():
            slot.state = ResourceState.CLOSED

    def _slot(self, spec: Resource[Any] | str) -> _Slot:
        name = spec if isinstance(spec, str) else spec.name
        try:
            return self._slots[name]
        except KeyError:
            raise LookupError(
                f"no resource named {name!r} is declared; declare it with "
                "create_app(resources=[...]) or registry.declare()"
            ) from None
