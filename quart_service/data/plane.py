"""The data plane of one worker: leader election, refresh of every dataset, swaps.

Every worker runs :meth:`DataPlane.run`. Exactly one per host holds the leader lock::

    leader:    every refresh_interval:
                 SELECT table_name, revision FROM table_revisions     (1 statement)
               a dataset's tables moved?  load it into its own file (only that one)
               anything new?  publish snapshot.json (generation + 1)
    everyone:  every refresh_interval/5: stat(snapshot.json)           (no database)
               changed?  open the new version of each dataset that changed, swap

So the database sees one small statement per interval per host, whatever the number
of workers and datasets. A dataset whose load fails keeps its last good version, is
reported stale by name, and is retried on the next poll; the others go on. If the
database itself fails, workers keep the last snapshot; the leader retries with
backoff, logs once per change of state, and records the trouble in ``refresh.json``
so every worker's ``/readyz`` can report how stale the data is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..cancelling import pause, stop
from ..coordination.local import LeaderLock, PublishedFile
from ..observability.metrics import Count
from .database import Database
from .datasets import Dataset

if TYPE_CHECKING:
    from .cluster import ClusterFeed, Poll
from .markers import MARKERS_QUERY
from .published import DatasetView, Published, write_rows
from .snapshot import DatasetTrouble, Snapshot

__all__ = ["DataPlane", "Freshness", "PlaneCounts", "SwapListener"]

_log = logging.getLogger("quart_service.data")

_MAX_BACKOFF = 5.0  # one statement per host: cheap to retry; data fresh within 5 s of recovery
_FILES = "datasets"
# One file per worker: the generation it serves (so a writer can wait for all of them).
_SERVED = "workers"

#: Called with the snapshot served before (None at first) and the new one.
SwapListener = Callable[[Snapshot | None, Snapshot], None]


class PlaneCounts:
    """What the plane counts: refreshes published, failed polls, times it became leader."""

    __slots__ = ("dataset_failures", "leader_changes", "poll_failures", "refresh_runs")

    def __init__(
        self,
        refresh_runs: Count | None = None,
        poll_failures: Count | None = None,
        leader_changes: Count | None = None,
        dataset_failures: Count | None = None,
    ) -> None:
        self.refresh_runs = refresh_runs or Count()
        self.poll_failures = poll_failures or Count()
        self.leader_changes = leader_changes or Count()
        self.dataset_failures = dataset_failures or Count()

    def as_dict(self) -> dict[str, int | float]:
        """The tallies of this worker."""
        return {
            "refresh_runs": self.refresh_runs.value,
            "poll_failures": self.poll_failures.value,
            "leader_changes": self.leader_changes.value,
            "dataset_failures": self.dataset_failures.value,
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


@dataclass(frozen=True, slots=True)
class _Entry:
    """One dataset's published version, as the manifest records it."""

    version: int
    revisions: dict[str, int | None]
    file: str  # relative to the data folder
    columns: list[str]
    rows: int
    key: str | None
    loaded_at: float


@dataclass(frozen=True, slots=True)
class _Manifest:
    """What ``snapshot.json`` holds: the generation and each dataset's entry."""

    generation: int
    published_at: float
    entries: dict[str, _Entry]
    trouble: dict[str, DatasetTrouble]

    def to_json(self) -> str:
        return json.dumps(
            {
                "generation": self.generation,
                "published_at": self.published_at,
                "datasets": {name: asdict(entry) for name, entry in self.entries.items()},
                "trouble": {name: t.as_dict() for name, t in self.trouble.items()},
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> _Manifest:
        data = json.loads(text)
        return cls(
            int(data["generation"]),
            float(data["published_at"]),
            {name: _Entry(**entry) for name, entry in data["datasets"].items()},
            {name: DatasetTrouble(**t) for name, t in data.get("trouble", {}).items()},
        )


class DataPlane:
    """This worker's view of the shared data, and its part in keeping it fresh."""

    def __init__(
        self,
        data_dir: Path,
        refresh_interval: float,
        database: Database,
        datasets: Sequence[Dataset[Any]],
        counts: PlaneCounts | None = None,
        *,
        cluster: Callable[[Poll], ClusterFeed] | None = None,
    ) -> None:
        """``cluster``: builds this host's feed from the cluster (several hosts through
        Redis) once this worker leads its host; without it the host polls alone."""
        self.interval = refresh_interval
        self._cluster = cluster
        self.feed: ClusterFeed | None = None
        self._feed_task: asyncio.Task[None] | None = None
        self._applied = 0  # the cluster generation this host last applied
        self._revisions: dict[str, int] = {}
        self._health: dict[str, Any] | None = None
        self.data_dir = data_dir
        self.datasets = {dataset.name: dataset for dataset in datasets}
        self._database = database
        self._lock = LeaderLock(data_dir / "leader.lock")
        self._manifest_file = PublishedFile(data_dir / "snapshot.json")
        self._status_file = PublishedFile(data_dir / "refresh.json")
        # Touched by a worker that wrote to the database: the leader polls at once.
        self._request_file = PublishedFile(data_dir / "refresh.request")
        self._poll_now = False
        self._served_file = PublishedFile(data_dir / _SERVED / str(os.getpid()))
        self._started = _start_time(os.getpid())
        self._manifest: _Manifest | None = None
        self.snapshot: Snapshot | None = None
        self.swapped_at: float | None = None
        self.counts = counts or PlaneCounts()
        self._failing_since: float | None = None
        self._listeners: list[SwapListener] = []

    # -- what the rest of the service reads ---------------------------------------------

    @property
    def role(self) -> str:
        """``leader`` or ``follower``."""
        return "leader" if self._lock.held else "follower"

    @property
    def generation(self) -> int:
        """The generation of the snapshot this worker serves (0 before the first)."""
        return self.snapshot.generation if self.snapshot is not None else 0

    def on_swap(self, listener: SwapListener) -> None:
        """Call ``listener(old, new)`` with each new snapshot this worker serves."""
        self._listeners.append(listener)

    def freshness(self) -> Freshness:
        """The leader's last word on the database (read from refresh.json)."""
        text = self._status_file.read()
        try:
            return Freshness(json.loads(text) if text else None)
        except ValueError:
            return Freshness(None)

    def revisions(self, name: str) -> Mapping[str, int | None]:
        """The table revisions the served version of a dataset was loaded at."""
        entry = self._manifest.entries.get(name) if self._manifest else None
        return MappingProxyType(dict(entry.revisions) if entry else {})

    async def first_snapshot(self) -> Snapshot:
        """The snapshot to serve: the published one, waiting a little for the leader
        to publish the first (it does so as soon as it is elected)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(5.0, 3 * self.interval)
        while self.snapshot is None:
            self._follow()
            if self.snapshot is not None:
                break
            if loop.time() >= deadline:
                error = self.freshness().error
                raise LookupError(
                    "no snapshot published yet"
                    + (f": the refresh leader fails ({error})" if error else "")
                )
            await asyncio.sleep(0.05)
        return self.snapshot

    def request_refresh(self) -> None:
        """Ask this host's leader to poll now rather than at its next interval (this
        worker just wrote to the database). Without Redis the leader hears it within
        ``min(refresh_interval / 5, 0.25)`` s; in a cluster the change comes with the
        cluster's next poll."""
        if self._lock.held:
            self._poll_now = True
        else:
            try:
                self._request_file.publish(f"{os.getpid()} {time.time()}")
            except OSError as exc:
                _log.warning("cannot ask the leader to refresh: %s", exc)

    async def wait_served(self, dataset: str, revisions: Mapping[str, int], timeout: float) -> bool:
        """Wait until every live worker of this host serves ``dataset`` loaded at
        ``revisions`` or later (the table revisions a write produced); False if
        ``timeout`` seconds passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def here() -> bool:
            served = self.revisions(dataset)
            return all((served.get(t) or 0) >= r for t, r in revisions.items())

        while not here():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        generation = self.generation
        while any(served < generation for served in self._workers_served()):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def _workers_served(self) -> list[int]:
        """The generation each live worker of this host serves (from their files)."""
        served: list[int] = []
        try:
            files = list((self.data_dir / _SERVED).iterdir())
        except FileNotFoundError:
            return served
        for path in files:
            if not path.name.isdigit():
                continue  # a file being written (``<pid>.<random>``)
            try:
                generation, started = (int(part) for part in path.read_text().split())
            except (OSError, ValueError):
                continue  # being replaced, or gone
            if _start_time(int(path.name)) != started:
                path.unlink(missing_ok=True)  # that worker is gone (or its pid reused)
                continue
            served.append(generation)
        return served

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Elect, poll, publish, follow; until cancelled at shutdown."""
        loop = asyncio.get_running_loop()
        follow_every = min(max(self.interval / 5, 0.02), 0.25)
        next_poll = 0.0
        backoff = self.interval
        try:
            while True:
                try:
                    next_poll, backoff = await self._round(next_poll, backoff)
                except Exception:
                    # A bug here must not stop the refresh (nor free the lock): log it.
                    _log.exception("the refresh loop failed; it goes on")
                    next_poll = loop.time() + self.interval
                await pause(follow_every)
        finally:
            self._served_file.path.unlink(missing_ok=True)
            if self._feed_task is not None:
                await stop(self._feed_task, "the cluster feed")
            self._lock.release()

    async def _round(self, next_poll: float, backoff: float) -> tuple[float, float]:
        """One turn of the loop: lead if the lock is free, refresh when due, follow."""
        loop = asyncio.get_running_loop()
        if not self._lock.held and self._lock.try_acquire():
            self.counts.leader_changes.inc()
            _log.info("worker %d is now the refresh leader", os.getpid())
            self._follow()  # start from what the last leader published
            self._remove_partial_files()
            next_poll = 0.0
        if self._lock.held and self._cluster is not None:
            retry = loop.time() >= next_poll
            await self._from_cluster(retry=retry)
            if retry:
                next_poll = self._after(next_poll, self.interval)
        elif self._lock.held and (self._poll_requested() or loop.time() >= next_poll):
            succeeded = await self._poll()
            backoff = self.interval if succeeded else min(backoff * 2, _MAX_BACKOFF)
            next_poll = self._after(next_poll, backoff)
        self._follow()
        return next_poll, backoff

    def _after(self, due: float, wait: float) -> float:
        """When the next poll is due, ``wait`` after this one. On schedule, that is
        counted from when this poll was due, not from when it ended: the loop's tick
        finds a poll up to ``refresh_interval / 5`` late and the poll takes its own
        time, and counted from the end, both added up round after round (8 to 9 polls
        in 10 intervals). Early (asked for) or more than ``wait`` late: from now."""
        now = asyncio.get_running_loop().time()
        if 0 < due <= now < due + wait:
            return due + wait
        return now + wait

    def _poll_requested(self) -> bool:
        """A worker of this host wrote and asked for a poll now (one stat)."""
        asked = self._poll_now or self._request_file.read_if_changed() is not None
        self._poll_now = False
        return asked

    async def _markers(self) -> dict[str, int]:
        """Every watched table's revision: the one statement of a poll."""
        # Replaced (a restore) since it was opened: read the new file instead.
        await self._database.reopen_if_replaced()
        try:
            rows = await self._database.fetchall(MARKERS_QUERY, kind="poll")
        except Exception:
            # A connection to a replaced or deleted file never recovers: reopen it.
            await self._database.close()
            raise
        return {str(row[0]): int(row[1]) for row in rows}

    async def _from_cluster(self, *, retry: bool) -> None:
        """A host leader in a cluster: apply what the cluster leader published, or
        retry the datasets that failed here when ``retry``."""
        assert self._cluster is not None
        if self.feed is None:
            self.feed = self._cluster(self._markers)
            self._feed_task = asyncio.get_running_loop().create_task(self.feed.run())
        feed = self.feed
        state = feed.latest
        health = feed.health()
        if state is not None and state.generation > self._applied:
            self._revisions = dict(state.revisions)
            status = {"failing_since": state.failing_since, "error": state.error}
            self._write_status(status, checked_at=state.checked_at, coordination=health)
            self._health = health
            await self._refresh(self._revisions)  # if it raises, the next turn tries again
            self._applied = state.generation
            return
        if health != self._health:
            self._health = health
            self._write_status(self.freshness().data, coordination=health)
        if retry and self._manifest is not None and self._manifest.trouble:
            await self._refresh(self._revisions)

    async def _poll(self) -> bool:
        """One leader round: 1 statement, plus a load of each dataset that moved."""
        try:
            # A dataset's own failure is its trouble (inside); this fails the whole poll
            # only when the markers cannot be read or nothing can be published.
            await self._refresh(await self._markers())
        except Exception as exc:
            self._failed(exc)
            return False
        self._recovered()
        return True

    async def _refresh(self, markers: Mapping[str, int | None]) -> None:
        """Load the datasets whose tables moved (or that failed last time); publish."""
        previous = self._manifest
        entries = dict(previous.entries) if previous else {}
        trouble = dict(previous.trouble) if previous else {}
        generation = max(self._published_generation(), self.generation) + 1
        moved: list[str] = []
        for name, dataset in self.datasets.items():
            revisions = {table: markers.get(table) for table in dataset.tables}
            entry = entries.get(name)
            if entry is not None and entry.revisions == revisions and name not in trouble:
                continue
            try:
                published = await self._load(dataset, generation)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                old = trouble.get(name)
                if old is None or old.error != error:
                    self.counts.dataset_failures.inc()
                    _log.warning(
                        "dataset %r failed to load, serving its last version: %s", name, error
                    )
                    trouble[name] = DatasetTrouble(error, old.failing_since if old else time.time())
                    moved.append(name)
                continue
            if name in trouble:
                _log.info("dataset %r recovered", name)
                del trouble[name]
            entries[name] = _Entry(
                version=generation,
                revisions=revisions,
                file=str(published.path.relative_to(self.data_dir)),
                columns=list(published.columns),
                rows=published.rows,
                key=dataset.key,
                loaded_at=time.time(),
            )
            moved.append(name)
        if not moved:
            return
        manifest = _Manifest(generation, time.time(), entries, trouble)
        self._manifest_file.publish(manifest.to_json())
        self._adopt(manifest)
        self.counts.refresh_runs.inc()
        _log.info("published snapshot generation %d (%s)", generation, ", ".join(moved))
        self._remove_old_files(entries)

    async def _load(self, dataset: Dataset[Any], version: int) -> Published:
        path = self.data_dir / _FILES / dataset.name / f"{version}.sqlite"
        if dataset.query is not None:
            return await self._database.copy_query(dataset.query, path, dataset.key)
        assert dataset.loader is not None
        rows = list(await dataset.loader(self._database))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, write_rows, path, rows, dataset.key)

    def _published_generation(self) -> int:
        text = self._manifest_file.read()
        if not text:
            return 0
        try:
            return int(json.loads(text)["generation"])
        except (ValueError, KeyError, TypeError):
            return 0

    # -- following: every worker ------------------------------------------------------

    def _follow(self) -> None:
        try:
            text = self._manifest_file.read_if_changed()
            if text is None:
                return
            manifest = _Manifest.from_json(text)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A manifest from an older version of the service: the leader replaces it.
            _log.debug("cannot read the published snapshot: %s", exc)
            return
        if self.snapshot is None or manifest.generation > self.snapshot.generation:
            self._adopt(manifest)

    def _adopt(self, manifest: _Manifest) -> None:
        """Serve ``manifest``: open the datasets whose version changed, keep the rest."""
        current = self.snapshot.datasets if self.snapshot else {}
        views: dict[str, DatasetView[Any]] = {}
        for name, dataset in self.datasets.items():
            entry = manifest.entries.get(name)
            if entry is None:
                continue
            view = current.get(name)
            if view is None or view.version != entry.version:
                try:
                    view = DatasetView(
                        name,
                        entry.version,
                        self.data_dir / entry.file,
                        columns=entry.columns,
                        rows=entry.rows,
                        key=entry.key,
                        loaded_at=entry.loaded_at,
                        build=dataset.build,
                        stamp=_stamp(dataset, entry.revisions),
                    )
                except (OSError, sqlite3.Error) as exc:
                    # Already replaced and removed: a newer manifest names its successor.
                    _log.info("dataset %r version %d is gone (%s)", name, entry.version, exc)
                    self._manifest_file.forget()
                    return
            views[name] = view
        self._manifest = manifest
        trouble = {n: t for n, t in manifest.trouble.items() if n in self.datasets}
        self._swap(
            Snapshot(
                manifest.generation,
                manifest.published_at,
                MappingProxyType(views),
                MappingProxyType(trouble),
            )
        )

    def _swap(self, snapshot: Snapshot) -> None:
        old, self.snapshot = self.snapshot, snapshot
        self.swapped_at = time.time()
        try:
            self._served_file.publish(f"{snapshot.generation} {self._started}")
        except OSError as exc:
            _log.warning("cannot record the generation this worker serves: %s", exc)
        for listener in self._listeners:
            try:
                listener(old, snapshot)
            except Exception:
                _log.exception("a snapshot listener failed")

    # -- files ------------------------------------------------------------------------

    def _remove_old_files(self, entries: Mapping[str, _Entry]) -> None:
        """Keep each dataset's current and previous version; unlink older ones (a worker
        still reading one keeps it open: an unlinked file lives until closed)."""
        for name, entry in entries.items():
            folder = self.data_dir / _FILES / name
            versions = [int(p.stem) for p in folder.glob("*.sqlite") if p.stem.isdigit()]
            older = sorted(v for v in versions if v < entry.version)
            for version in older[:-1]:
                (folder / f"{version}.sqlite").unlink(missing_ok=True)

    def _remove_partial_files(self) -> None:
        """Files a previous leader died writing."""
        for path in (self.data_dir / _FILES).glob("*/.*.tmp"):
            path.unlink(missing_ok=True)

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

    def _write_status(
        self,
        state: Mapping[str, Any],
        *,
        checked_at: float | None = None,
        coordination: Mapping[str, Any] | None = None,
    ) -> None:
        previous = self.freshness().data
        if checked_at is None:
            checked_at = previous.get("checked_at") if state.get("failing_since") else time.time()
        status = {
            "leader_pid": os.getpid(),
            "checked_at": checked_at,
            "generation": self.generation,
            "failing_since": state.get("failing_since"),
            "error": state.get("error"),
        }
        if coordination is not None:
            status["coordination"] = dict(coordination)
        try:
            self._status_file.publish(json.dumps(status))
        except OSError as exc:
            _log.warning("cannot write refresh status: %s", exc)


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (None: no such process):
    with the pid, it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields count from the last ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def _stamp(dataset: Dataset[Any], revisions: Mapping[str, int | None]) -> str:
    """The revisions of a dataset's tables, in its declared order: ``"12"``, ``"9.2"``."""
    return ".".join(str(revisions.get(table, "x")) for table in dataset.tables)
