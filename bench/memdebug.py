"""Where a worker's memory and pauses go: an env-gated hook for the bench apps.

    BENCH_MEMDEBUG=/tmp/dir hypercorn --config hypercorn.toml bench.memdebug:service

With ``BENCH_MEMDEBUG`` set, importing this module (which each worker does, to load
the app) installs a ``SIGUSR1`` handler and times every garbage collection. The first
signal takes the baseline (and touches ``DIR/PID.base``); every later one writes
``DIR/PID.json``: the collections since the baseline (generation, start, seconds, CPU) and the
garbage-collected objects added, by type. With ``BENCH_MEMDEBUG_TRACE=1`` too,
:mod:`tracemalloc` runs from import and the report adds the traced bytes and
allocations added, by allocating line (with its three callers) and by package.
``python -m bench.idle_streams --breakdown`` drives it. Without the variable this
module only re-exports the bench apps.

Tracing makes every allocation slower and adds its own bookkeeping (not in the
snapshots), so use it with a few thousand streams, not for the timed figures.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sysconfig
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType

from bench.apps import bare, service
from bench.idle_asgi import app as asgi

__all__ = ["asgi", "bare", "owner", "service"]

# Enough frames to get past asyncio's own to the code that asked for the allocation.
_FRAMES = 12
_STDLIB = os.path.dirname(os.__file__)
_SITE = sysconfig.get_paths()["purelib"]
_ROOT = str(Path(__file__).resolve().parents[1])
_PACKAGES = ("hypercorn", "h11", "h2", "wsproto", "quart_service", "quart", "werkzeug", "bench")


def owner(filename: str) -> str:
    """The package (or stdlib module folder) a source file belongs to."""
    parts = filename.replace("\\", "/").split("/")
    for package in _PACKAGES:
        if package in parts:
            index = len(parts) - 1 - parts[::-1].index(package)
            if package == "quart_service" and index + 1 < len(parts) - 1:
                return f"quart_service.{parts[index + 1]}"
            return package
    if "asyncio" in parts:
        return "asyncio"
    return parts[-1] if parts else "?"


def _short(filename: str) -> str:
    """``package/module.py`` from a full path (site-packages or this checkout)."""
    path = filename.replace("\\", "/")
    for prefix in (_SITE, _ROOT, _STDLIB):
        if path.startswith(prefix + "/"):
            return path[len(prefix) + 1 :]
    return path


def requester(traceback: tracemalloc.Traceback) -> str:
    """Who asked for an allocation: the innermost frame outside the standard library
    (asyncio's Task, Future, Event, deque ... are charged to the code that made them).
    With only standard-library frames, the event loop itself allocated (uvloop, in C:
    transports, handles, read buffers), called from ``asyncio.run``. ``via`` names the
    standard-library module that made the allocation, if one did."""
    innermost = traceback[-1]  # a Traceback runs from the oldest frame
    via = "" if _ours(innermost.filename) else f" via {_short(innermost.filename)}"
    for frame in reversed(traceback):
        if _ours(frame.filename):
            return f"{_short(frame.filename)}:{frame.lineno}{via}"
    return "(the event loop, in C)"


def _ours(filename: str) -> bool:
    """Not the standard library: site-packages or this checkout."""
    return filename.startswith(_SITE) or not filename.startswith((_STDLIB, "<frozen"))


def _types() -> Counter[str]:
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        counts[f"{kind.__module__}.{kind.__qualname__}"] += 1
    return counts


class _Probe:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.based = False
        self.base: tracemalloc.Snapshot | None = None
        self.base_types: Counter[str] = Counter()
        # Collections since the baseline: (generation, wall-clock start, seconds, CPU seconds).
        self.pauses: list[tuple[int, float, float, float]] = []
        self._gc_began = self._gc_cpu = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_began = time.perf_counter()
            self._gc_cpu = time.thread_time()
        elif self.based:
            took = time.perf_counter() - self._gc_began
            cpu = time.thread_time() - self._gc_cpu
            self.pauses.append((info["generation"], time.time() - took, took, cpu))

    def _snapshot(self) -> tracemalloc.Snapshot | None:
        if not tracemalloc.is_tracing():
            return None
        return tracemalloc.take_snapshot().filter_traces(
            [
                tracemalloc.Filter(False, tracemalloc.__file__),
                tracemalloc.Filter(False, __file__),
            ]
        )

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        gc.collect()
        collect = (time.perf_counter() - wall, time.thread_time() - cpu)
        if not self.based:
            self.base = self._snapshot()
            self.base_types = _types()
            self.based = True
            (self.folder / f"{os.getpid()}.base").touch()
            return
        pauses = self.pauses
        self.pauses = []
        report: dict[str, object] = {
            "pid": os.getpid(),
            "gc_pauses": pauses,
            "gc_tracked": len(gc.get_objects()),
            "gc_collect": collect,  # one full collection on demand: (wall, CPU) seconds
        }
        types = _types()
        added = {name: n - self.base_types[name] for name, n in types.items()}
        report["types"] = {k: v for k, v in sorted(added.items(), key=lambda kv: -kv[1]) if v > 0}
        snapshot = self._snapshot()
        if snapshot is not None and self.base is not None:
            report.update(_compare(snapshot, self.base))
        report["report_s"] = time.perf_counter() - wall
        path = self.folder / f"{os.getpid()}.json"
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps(report))
        partial.rename(path)


def _compare(snapshot: tracemalloc.Snapshot, base: tracemalloc.Snapshot) -> dict[str, object]:
    lines: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for stat in snapshot.compare_to(base, "traceback"):
        if stat.size_diff == 0 and stat.count_diff == 0:
            continue
        who = requester(stat.traceback)
        lines[who] += stat.size_diff
        counts[who] += stat.count_diff
    traced = sum(stat.size for stat in snapshot.statistics("filename"))
    traced -= sum(stat.size for stat in base.statistics("filename"))
    return {
        "traced": traced,
        "lines": {line: [size, counts[line]] for line, size in lines.items()},
    }


def _install() -> None:
    folder = os.environ.get("BENCH_MEMDEBUG")
    if not folder:
        return
    if os.environ.get("BENCH_MEMDEBUG_TRACE") == "1":
        tracemalloc.start(_FRAMES)
    probe = _Probe(Path(folder))
    gc.callbacks.append(probe.on_gc)
    signal.signal(signal.SIGUSR1, probe.on_signal)


_install()
