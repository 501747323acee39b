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

A resource may depend on datasets (``datasets=["flags"]``): when a new version of one
of them is swapped in, each worker rebuilds its instance once, in the background,
while requests go on using the old one; the old one is closed ``retire_after``
seconds later, so requests that hold it finish with it.

A burst of first requests waits on one asyncio lock per resource, so the factory runs
once. A factory that raises leaves the resource ``failed``; the next use tries again.
The registry is a part of the worker (:class:`~quart_service.part.Part`): ``/readyz``
asks it whether every required resource is ready, and retries the failed ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from contextvars import copy_context
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, cast

from .errors import Overloaded, ResourceUnavailable
from .observability.metrics import Count, Metrics
from .part import Readiness

__all__ = ["Resource", "ResourceRegistry", "ResourceState", "ResourceStatus"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

_log = logging.getLogger("quart_service.resources")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


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
    :meth:`ResourceRegistry.run_sync` / :meth:`ResourceRegistry.slot`. ``datasets``
    (names or :class:`~quart_service.data.datasets.Dataset` declarations) make it
    rebuilt when one of them changes; the replaced instance is closed
    ``retire_after`` seconds later.
    """

    name: str
    factory: Callable[[], Awaitable[T]]
    close: Callable[[T], Awaitable[None]] | None = None
    required: bool = False
    limit: int | None = None
    warm: bool = False
    datasets: Sequence[str | _Named] = ()
    retire_after: float = 30.0

    @property
    def dataset_names(self) -> frozenset[str]:
        """The names of the datasets it is built from."""
        return frozenset(d if isinstance(d, str) else d.name for d in self.datasets)


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
    builds: int = 0

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
            "builds": self.builds,
        }


@dataclass(slots=True, eq=False)
class _Holder:
    """The per-process state of one resource: its instance and its concurrency places."""

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
    builds: int = 0
    rebuild_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    rebuild_pending: bool = False

    def is_ready(self) -> bool:
        return self.state is ResourceState.READY


class ResourceRegistry:
    """Holds this process's resource instances; one per worker, declared in create_app."""

    name = "resources"

    def __init__(
        self,
        specs: Iterable[Resource[Any]] = (),
        *,
        max_waiting: int = 64,
        warm_all: bool = False,
        retry_after: float = 1.0,
    ) -> None:
        self._holders: dict[str, _Holder] = {}
        self._order: list[_Holder] = []  # creation order, closed in reverse
        self._max_waiting = max_waiting
        self._warm_all = warm_all
        self._retry_after = retry_after
        self._busy = Count()
        self._background: set[asyncio.Task[None]] = set()
        for spec in specs:
            self.declare(spec)

    def declare(self, spec: Resource[T]) -> Resource[T]:
        """Add a declaration; a second one under the same name is refused."""
        if spec.name in self._holders:
            raise ValueError(f"resource {spec.name!r} is declared twice")
        if spec.limit is not None and spec.limit < 1:
            raise ValueError(f"resource {spec.name!r}: limit must be >= 1, got {spec.limit}")
        holder = _Holder(spec)
        if spec.limit is not None:
            holder.semaphore = asyncio.Semaphore(spec.limit)
        self._holders[spec.name] = holder
        return spec

    def __contains__(self, name: object) -> bool:
        return name in self._holders

    def names(self) -> list[str]:
        """The declared names, in declaration order."""
        return list(self._holders)

    async def get(self, spec: Resource[T] | str) -> T:
        """This process's instance, created on first use (once, even under a burst)."""
        holder = self._holder(spec)
        if holder.state is ResourceState.READY:  # the fast path takes no lock
            return cast(T, holder.value)
        async with holder.lock:
            # Another task may have created it while this one waited for the lock.
            if holder.is_ready():
                return cast(T, holder.value)
            if holder.state is ResourceState.CLOSED:
                raise ResourceUnavailable(
                    f"resource {holder.spec.name!r} is closed (shutting down)"
                )
            holder.state = ResourceState.CREATING
            try:
                value = await holder.spec.factory()
            except Exception as exc:
                holder.state = ResourceState.FAILED
                holder.error = f"{type(exc).__name__}: {exc}"
                _log.warning("resource %r failed to initialise: %s", holder.spec.name, holder.error)
                raise ResourceUnavailable(
                    f"resource {holder.spec.name!r} could not be created ({holder.error}); "
                    "it is retried on the next request"
                ) from exc
            except BaseException:
                # Cancelled while creating: nothing was made; the next use retries.
                holder.state = ResourceState.NOT_CREATED
                raise
            holder.value = value
            holder.instance_id = uuid.uuid4().hex[:12]
            holder.created_at = time.time()
            holder.error = None
            holder.state = ResourceState.READY
            holder.builds += 1
            self._order.append(holder)
            _log.info("resource %r ready (instance %s)", holder.spec.name, holder.instance_id)
            return cast(T, value)

    async def warm(self, *, only_marked: bool = True) -> None:
        """Create resources now: those declared ``warm=True``, or all of them."""
        for holder in list(self._holders.values()):
            if holder.spec.warm or not only_marked:
                # A failure is reported by state and /readyz and retried on next use.
                with contextlib.suppress(ResourceUnavailable):
                    await self.get(holder.spec)

    @asynccontextmanager
    async def slot(self, spec: Resource[Any] | str) -> AsyncIterator[None]:
        """Hold one of the resource's concurrency places (no-op without a limit).

        When ``max_waiting`` callers already wait, the next is refused with
        :class:`Overloaded` instead of waiting without bound.
        """
        holder = self._holder(spec)
        semaphore = holder.semaphore
        if semaphore is None:
            holder.in_use += 1
            try:
                yield
            finally:
                holder.in_use -= 1
            return
        if semaphore.locked() and holder.waiting >= self._max_waiting:
            self._busy.inc()
            raise Overloaded(
                f"resource {holder.spec.name!r} is at its limit of {holder.spec.limit} "
                f"concurrent uses with {holder.waiting} waiting; retry shortly.",
                retry_after=self._retry_after,
            )
        holder.waiting += 1
        try:
            await semaphore.acquire()
        finally:
            holder.waiting -= 1
        holder.in_use += 1
        try:
            yield
        finally:
            holder.in_use -= 1
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
        holder = self._holder(spec)
        async with holder.lock:
            if holder.state is not ResourceState.READY:
                return
            value, holder.value = holder.value, None
            holder.state, holder.instance_id = ResourceState.NOT_CREATED, None
            self._order.remove(holder)
            if holder.spec.close is not None:
                try:
                    await holder.spec.close(value)
                except Exception:
                    _log.exception("closing resource %r failed", holder.spec.name)

    def rebuild_dependents(self, datasets: Iterable[str]) -> list[str]:
        """Rebuild, in the background, every created resource built from one of
        ``datasets``; returns their names."""
        changed = set(datasets)
        started: list[str] = []
        for holder in self._holders.values():
            if holder.state is not ResourceState.READY or holder.rebuild_pending:
                continue  # not created (it will read the new data) or already queued
            if changed & holder.spec.dataset_names:
                holder.rebuild_pending = True
                self._spawn(self._rebuild(holder))
                started.append(holder.spec.name)
        return started

    async def _rebuild(self, holder: _Holder) -> None:
        async with holder.rebuild_lock:
            holder.rebuild_pending = False  # a change from now on queues another rebuild
            if holder.state is not ResourceState.READY:
                return
            try:
                value = await holder.spec.factory()
            except Exception as exc:
                # Requests keep the instance they have; the next change tries again.
                holder.error = f"rebuild failed, serving the previous instance: {exc!r}"
                _log.warning("resource %r: %s", holder.spec.name, holder.error)
                return
            old, holder.value = holder.value, value
            holder.instance_id = uuid.uuid4().hex[:12]
            holder.created_at = time.time()
            holder.error = None
            holder.builds += 1
            _log.info("resource %r rebuilt (instance %s)", holder.spec.name, holder.instance_id)
            if holder.spec.close is not None:
                self._spawn(self._retire(holder.spec, old))

    async def _retire(self, spec: Resource[Any], value: Any) -> None:
        try:
            await asyncio.sleep(spec.retire_after)
        finally:  # at shutdown, close it now
            assert spec.close is not None
            try:
                await spec.close(value)
            except Exception:
                _log.exception("closing a replaced instance of %r failed", spec.name)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
                builds=s.builds,
            )
            for s in self._holders.values()
        ]

    async def aclose(self) -> None:
        """Close every created instance in reverse creation order; errors are logged."""
        while self._order:
            holder = self._order.pop()
            async with holder.lock:
                value, holder.value = holder.value, None
                holder.state = ResourceState.CLOSED
                if holder.spec.close is not None:
                    try:
                        await holder.spec.close(value)
                    except Exception:
                        _log.exception("closing resource %r failed", holder.spec.name)
        for holder in self._holders.values():
            holder.state = ResourceState.CLOSED

    # -- the registry as a part of the worker -------------------------------------------

    async def start(self, metrics: Metrics) -> None:
        """Count refusals into ``metrics``; create the resources marked ``warm`` (or
        all of them), then start the required ones in the background."""
        self._busy = metrics.count(metrics.shed, "resource_busy")
        metrics.on_sample(self._sample)
        await self.warm(only_marked=not self._warm_all)
        # Readiness depends on required resources: start them now, without holding
        # up start-up, so /readyz turns green without waiting for a first request.
        self.ensure_required()

    async def stop(self) -> None:
        """Close every instance in reverse creation order."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.aclose()

    async def readiness(self) -> Readiness:
        """Ready when every required resource is; a failed one is retried now."""
        ready = Readiness()
        for status in self.status():
            if not status.required:
                continue
            ready.checks[status.name] = status.state.value
            if status.state is not ResourceState.READY:
                detail = f": {status.error}" if status.error else ""
                ready.problems.append(f"resource {status.name!r} is {status.state.value}{detail}")
        if ready.problems:
            self.ensure_required()  # so readiness recovers by itself
        return ready

    def identity(self) -> list[dict[str, Any]]:
        """Every resource's state and instance id in this process."""
        return [status.as_dict() for status in self.status()]

    def state_of(self, name: str) -> ResourceState:
        """The state of the resource called ``name`` in this process."""
        return self._holder(name).state

    def ensure_required(self) -> None:
        """Start creating each required resource that is not ready, in the background."""
        for holder in self._holders.values():
            if holder.spec.required and holder.state in (
                ResourceState.NOT_CREATED,
                ResourceState.FAILED,
            ):
                self._spawn(self._create(holder.spec))

    async def _create(self, spec: Resource[Any]) -> None:
        # A failure is logged and recorded in the state; retried on the next use.
        with contextlib.suppress(Exception):
            await self.get(spec)

    def _sample(self, metrics: Metrics) -> None:
        for status in self.status():
            for state in ResourceState:
                value = 1 if status.state is state else 0
                metrics.resource_state.labels(status.name, state.value).set(value)

    def _holder(self, spec: Resource[Any] | str) -> _Holder:
        name = spec if isinstance(spec, str) else spec.name
        try:
            return self._holders[name]
        except KeyError:
            raise LookupError(
                f"no resource named {name!r} is declared; declare it with "
                "create_app(resources=[...]) or registry.declare()"
            ) from None
