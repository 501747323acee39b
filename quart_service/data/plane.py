"""The data plane of one worker: leader election, refresh, and the current snapshot.

Every worker runs :meth:`DataPlane.run`. Exactly one per host holds the leader lock::

    leader:    every refresh_interval: SELECT revision FROM change_marker   (1 query)
               moved?  SELECT ... FROM models  →  publish snapshot.json (generation+1)
    everyone:  every refresh_interval/5: stat(snapshot.json)   (no database)
               changed?  read it, swap the in-memory snapshot

So the database sees one small query per interval per host, whatever the number of
workers. If the database fails, workers keep the last good snapshot; the leader
retries with backoff, logs once per state change, and records the trouble in
``refresh.json`` so every worker's ``/readyz`` can report how stale the data is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..coordination.local import LeaderLock, PublishedFile
from ..observability.metrics import Count
from .database import Database
from .models import ModelRepository
from .snapshot import Snapshot

__all__ = ["DataPlane", "Freshness", "PlaneCounts"]

_log = logging.getLogger("quart_service.data")

_MAX_BACKOFF = 30.0


class PlaneCounts:
    """What the plane counts: refreshes published, failed polls, times it became leader."""

    __slots__ = ("leader_changes", "poll_failures", "refresh_runs")

    def __init__(
        self,
        refresh_runs: Count | None = None,
        poll_failures: Count | None = None,
        leader_changes: Count | None = None,
    ) -> None:
        self.refresh_runs = refresh_runs or Count()
        self.poll_failures = poll_failures or Count()
        self.leader_changes = leader_changes or Count()

    def as_dict(self) -> dict[str, int | float]:
        """The tallies of this worker."""
        return {
            "refresh_runs": self.refresh_runs.value,
            "poll_failures": self.poll_failures.value,
            "leader_changes": self.leader_changes.value,
        }


class Freshness:
    """What the leader last wrote to ``refresh.json``: how current the data is."""

    def __init__(self, data: dict[str, Any] | None) -> None:
        self.data = data or {}

    @property
    def checked_at(self) -> float | None:
        """When the leader last reached the database successfully."""
        value = self.data.get("checked_at")
        return float(value) if value is not None else None

    @property
    def failing_since(self) -> float | None:
        """Since when the leader cannot reach the database (None: it can)."""
        value = self.data.get("failing_since")
        return float(value) if value is not None else None

    @property
    def error(self) -> str | None:
        """The leader's last error."""
        value = self.data.get("error")
        return str(value) if value is not None else None


class DataPlane:
    """This worker's view of the shared data, and its part in keeping it fresh."""

    def __init__(
        self,
        data_dir: Path,
        refresh_interval: float,
        database: Database,
        models: ModelRepository,
        counts: PlaneCounts | None = None,
    ) -> None:
        self.interval = refresh_interval
        self._database = database
        self._models = models
        self._lock = LeaderLock(data_dir / "leader.lock")
        self._snapshot_file = PublishedFile(data_dir / "snapshot.json")
        self._status_file = PublishedFile(data_dir / "refresh.json")
        self.snapshot: Snapshot | None = None
        self.swapped_at: float | None = None
        self.counts = counts or PlaneCounts()
        self._failing_since: float | None = None
        self._listeners: list[Callable[[Snapshot], None]] = []

    # -- what the rest of the service reads ---------------------------------------------

    @property
    def role(self) -> str:
        """``leader`` or ``follower``."""
        return "leader" if self._lock.held else "follower"

    @property
    def generation(self) -> int:
        """The generation of the snapshot this worker serves (0 before the first)."""
        return self.snapshot.generation if self.snapshot is not None else 0

    def on_swap(self, listener: Callable[[Snapshot], None]) -> None:
        """Call ``listener`` with each new snapshot this worker starts serving."""
        self._listeners.append(listener)

    def freshness(self) -> Freshness:
        """The leader's last word on the database (read from refresh.json)."""
        text = self._status_file.read()
        try:
            return Freshness(json.loads(text) if text else None)
        except ValueError:
            return Freshness(None)

    async def first_snapshot(self) -> Snapshot:
        """The snapshot to serve now: the published one, or (none yet) one loaded here."""
        if self.snapshot is None:
            self._follow()
        if self.snapshot is None:
            # Nothing published yet (first start): load once ourselves, unpublished.
            revision = await self._revision(kind="startup")
            models = await self._models.all(kind="startup")
            if self.snapshot is None:  # the leader may have published meanwhile
                self._swap(Snapshot.of(0, revision, models))
        assert self.snapshot is not None
        return self.snapshot

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Elect, poll, publish, follow; until cancelled at shutdown."""
        loop = asyncio.get_running_loop()
        follow_every = min(max(self.interval / 5, 0.02), 0.25)
        next_poll = 0.0
        backoff = self.interval
        try:
            while True:
                if not self._lock.held and self._lock.try_acquire():
                    self.counts.leader_changes.inc()
                    _log.info("worker %d is now the refresh leader", os.getpid())
                    next_poll = 0.0
                if self._lock.held and loop.time() >= next_poll:
                    if await self._poll():
                        backoff = self.interval
                    else:
                        backoff = min(backoff * 2, _MAX_BACKOFF)
                    next_poll = loop.time() + backoff
                self._follow()
                await asyncio.sleep(follow_every)
        finally:
            self._lock.release()

    async def _poll(self) -> bool:
        """One leader round: 1 query, plus a load and a publish when data moved."""
        try:
            # Replaced (a restore) since it was opened: read the new file instead.
            await self._database.reopen_if_replaced()
            revision = await self._revision(kind="poll")
            current = self.snapshot
            if current is None or current.generation == 0 or revision != current.revision:
                models = await self._models.all(kind="load")
                generation = max(self._published_generation(), self.generation) + 1
                snapshot = Snapshot.of(generation, revision, models)
                self._snapshot_file.publish(snapshot.to_json())
                self._swap(snapshot)
                self.counts.refresh_runs.inc()
                _log.info("published snapshot generation %d (revision %d)", generation, revision)
        except Exception as exc:
            self._failed(exc)
            # A connection to a replaced or deleted file never recovers: reopen it.
            await self._database.close()
            return False
        self._recovered()
        return True

    async def _revision(self, *, kind: str) -> int:
        row = await self._database.fetchone(
            "SELECT sum(revision) FROM table_revisions", kind=kind
        )
        if row is None or row[0] is None:
            raise LookupError("table_revisions has no row; is the schema applied?")
        return int(row[0])

    def _published_generation(self) -> int:
        text = self._snapshot_file.read()
        return int(json.loads(text)["generation"]) if text else 0

    def _follow(self) -> None:
        try:
            text = self._snapshot_file.read_if_changed()
            if text is None:
                return
            snapshot = Snapshot.from_json(text)
        except (OSError, ValueError, KeyError) as exc:
            _log.warning("cannot read the published snapshot: %s", exc)
            return
        if self.snapshot is None or snapshot.generation > self.snapshot.generation:
            self._swap(snapshot)

    def _swap(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.swapped_at = time.time()
        for listener in self._listeners:
            listener(snapshot)

    # -- failure bookkeeping: log once per change of state ------------------------------

    def _failed(self, exc: Exception) -> None:
        self.counts.poll_failures.inc()
        error = f"{type(exc).__name__}: {exc}"
        if self._failing_since is None:
            self._failing_since = time.time()
            _log.warning("refresh failing, serving the last snapshot: %s", error)
        self._write_status({"failing_since": self._failing_since, "error": error})

    def _recovered(self) -> None:
        if self._failing_since is not None:
            _log.info("refresh recovered after %.1f s", time.time() - self._failing_since)
            self._failing_since = None
        self._write_status({"failing_since": None, "error": None})

    def _write_status(self, state: dict[str, Any]) -> None:
        previous = self.freshness().data
        checked_at = previous.get("checked_at") if state["failing_since"] else time.time()
        status = {
            "leader_pid": os.getpid(),
            "checked_at": checked_at,
            "generation": self.generation,
            **state,
        }
        try:
            self._status_file.publish(json.dumps(status))
        except OSError as exc:
            _log.warning("cannot write refresh status: %s", exc)
