"""Where the workers' metric values live, and how one scrape sums them.

Each server (a ``hypercorn`` or ``quart-service serve`` parent and its workers) gets
one folder, ``<metrics_root>/<pid>-<start time>`` of the parent process, so:

* the workers of one server find the same folder with no coordination (they all
  know their parent), also under the plain ``hypercorn`` command;
* a restarted server starts from zero instead of adding to a dead server's counts;
* the folders of servers that are gone are removed when the next one starts.

A worker that dies keeps its counters (a counter never goes back); its ``live*``
gauges are dropped at the next scrape (``mark_process_dead``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

__all__ = [
    "enable_multiprocess",
    "forget_process",
    "metrics_directory",
    "render",
    "server_identity",
]

_log = logging.getLogger("quart_service")

_ENV = "PROMETHEUS_MULTIPROC_DIR"
_SERVER_DIR = re.compile(r"^(\d+)-(\d+)$")
_LIVE_GAUGE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")
_directory: Path | None = None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: count fields after its ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def server_identity() -> str:
    """``<pid>-<start time>`` of the server: the process that spawned this worker,
    or this process when it is not a spawned worker."""
    parent = multiprocessing.parent_process()
    pid = parent.pid if parent is not None and parent.pid is not None else os.getpid()
    return f"{pid}-{_start_time(pid) or 0}"


def metrics_directory() -> Path | None:
    """This process's metric folder, once :func:`enable_multiprocess` ran."""
    return _directory


def enable_multiprocess(root: Path) -> Path:
    """Make this process's metric values live in the server's folder under ``root``.

    Call it before the first metric is created (at worker start-up). Once per
    process: later calls return the folder chosen first.
    """
    global _directory
    if _directory is not None:
        return _directory
    directory = root / server_identity()
    directory.mkdir(parents=True, exist_ok=True)
    _remove_dead_servers(root, keep=directory.name)
    os.environ[_ENV] = str(directory)
    # prometheus-client picks its value class when it is first imported; the
    # environment variable may have come too late for that, so set the class here.
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    _directory = directory
    return directory


def _remove_dead_servers(root: Path, keep: str) -> None:
    for entry in root.iterdir():
        match = _SERVER_DIR.match(entry.name)
        if match is None or entry.name == keep:
            continue
        pid, started = int(match[1]), int(match[2])
        if _start_time(pid) != started:  # gone, or the pid was reused since
            shutil.rmtree(entry, ignore_errors=True)
            _log.info("removed the metric files of a stopped server: %s", entry)


def forget_process(pid: int) -> None:
    """Drop the live gauges of a process that exited (its counters stay)."""
    if _directory is not None:
        with contextlib.suppress(OSError):
            mark_process_dead(pid, str(_directory))


def _drop_dead_gauges(directory: Path) -> None:
    for path in directory.iterdir():
        match = _LIVE_GAUGE.match(path.name)
        if match is None:
            continue
        pid = int(match[1])
        if _start_time(pid) is None:
            with contextlib.suppress(OSError):
                mark_process_dead(pid, str(directory))


def render(directory: Path, extra: Iterable[Collector] = ()) -> bytes:
    """The Prometheus text of every process's values in ``directory``, summed."""
    _drop_dead_gauges(directory)
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=str(directory))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)
