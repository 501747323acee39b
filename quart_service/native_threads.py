"""The native thread budget of a worker: how many threads native libraries may use.

OpenBLAS (under numpy) starts a thread per core in every process when it loads;
OpenMP, MKL, PyTorch and onnxruntime start pools of one thread per core per process
or per session. The worker's Python thread bound does not see them: W workers on a
C-core host run W x C native threads for C cores (docs/design.md, pitfall 10).

The budget is the CPUs this process may use -- its CPU affinity and its cgroup's CPU
quota; ``os.cpu_count()`` sees neither -- divided by the number of workers of the
server, at least 1 (or the ``native_threads`` setting). :func:`cap_native_threads`
applies it once per worker process, before model libraries load: it sets
``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and the others (a library reads them
when it loads), except those the operator set, and limits libraries loaded already
through threadpoolctl. Engines get the budget too (``EngineContext.native_threads``)
to size pools no variable reaches (onnxruntime's intra-op pool).

Where it runs (docs/process-model.md, "Native threads"): ``quart-service serve``
calls it in each worker before the app module is imported; under the ``hypercorn``
command (and Uvicorn, Granian) ``create_app()`` calls it first thing, so a library
that the app module imports before calling ``create_app()`` is only limited by
threadpoolctl, and OpenBLAS keeps the threads it started (parked).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .observability.proc import thread_count

__all__ = [
    "AUTO",
    "CAP_VARIABLES",
    "CGROUP_ROOT",
    "OFF",
    "SELF_CGROUP",
    "WORKERS_ENV",
    "NativeBudget",
    "affinity_cpus",
    "available_cpus",
    "budget_for",
    "cap_native_threads",
    "cgroup_cpu_limit",
    "loaded_libraries",
    "server_workers",
]

AUTO: Final = 0  # the setting's default: available CPUs / workers
OFF: Final = -1  # no caps: the libraries' own defaults (a thread per core)

CAP_VARIABLES: Final = (
    "OMP_NUM_THREADS",  # OpenMP: PyTorch's intra-op pool, MKL and OpenBLAS built with it
    "OPENBLAS_NUM_THREADS",  # numpy's and scipy's OpenBLAS
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",  # Apple Accelerate
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
)

# Which variables control a library threadpoolctl finds (its internal_api): one the
# operator set means the operator decides for that library.
_VARIABLES_OF: Final[Mapping[str, tuple[str, ...]]] = {
    "openblas": ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"),
    "mkl": ("MKL_NUM_THREADS", "OMP_NUM_THREADS"),
    "blis": ("BLIS_NUM_THREADS", "OMP_NUM_THREADS"),
    "openmp": ("OMP_NUM_THREADS",),
}

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
SELF_CGROUP: Final = Path("/proc/self/cgroup")
WORKERS_ENV: Final = "WEB_CONCURRENCY"  # the worker-count convention of Gunicorn and Uvicorn


@dataclass(frozen=True, slots=True)
class NativeBudget:
    """A worker's native thread budget and what was done to enforce it."""

    threads: int  # the budget handed to engines
    mode: str  # "auto" (CPUs / workers), "setting" (native_threads > 0) or "off"
    cpus: int  # CPUs this process may use (affinity and cgroup quota)
    workers: int | None  # the server's workers; None: not known in this process
    applied: bool  # the caps were applied in this process
    caps: Mapping[str, str] = field(default_factory=dict)  # variables set here
    operator_caps: Mapping[str, str] = field(default_factory=dict)  # set already, kept
    limited: tuple[str, ...] = ()  # libraries loaded before the caps, limited after

    def describe(self) -> str:
        """One line for the worker's start-up log."""
        if self.mode == "off":
            return f"off (native_threads = -1): libraries use their defaults, {self.cpus} CPUs"
        why = (
            f"{self.cpus} CPUs / {self.workers or 1} workers"
            if self.mode == "auto"
            else "the native_threads setting"
        )
        line = f"{self.threads} threads ({why})"
        if not self.applied:
            return line + "; caps not applied: not a server worker (see docs/process-model.md)"
        if self.operator_caps:
            line += "; kept the operator's " + ", ".join(
                f"{k}={v}" for k, v in self.operator_caps.items()
            )
        if self.limited:
            line += "; limited already loaded " + ", ".join(self.limited)
        return line

    def as_dict(self) -> dict[str, Any]:
        """For ``/debug/identity``: the budget, and the native pools as they are now."""
        return {
            "budget": self.threads,
            "mode": self.mode,
            "cpus": self.cpus,
            "workers": self.workers,
            "applied": self.applied,
            "caps": dict(self.caps),
            "operator_caps": dict(self.operator_caps),
            "limited_after_load": list(self.limited),
            "libraries": loaded_libraries(),
            # Threads Python did not start: the native pools (OpenBLAS, OpenMP, ...).
            "native_running": max(thread_count() - threading.active_count(), 0),
        }


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as ``taskset`` sets it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # no affinity API (macOS): all of them


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``1.5``), or None when none is set.

    A quota set at any level of the hierarchy throttles the whole subtree, so the
    smallest one from the process's cgroup up to the root counts. cgroup v2 keeps it in
    ``cpu.max`` (``"150000 100000"``, or ``"max 100000"``); v1 in ``cpu.cfs_quota_us``
    (``-1``: none) and ``cpu.cfs_period_us`` of the ``cpu`` controller. ``root`` and
    ``self_cgroup`` are parameters so tests can point them at files of their own.
    """
    try:
        lines = self_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "" and (root / "cgroup.controllers").exists():
            limits += _levels(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):
            mount = root / controllers
            if not mount.is_dir():
                mount = root / "cpu"
            limits += _levels(mount, path, _v1_limit)
    return min(limits, default=None)


def _levels(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits ``read`` finds in the cgroup at ``path`` and each of its ancestors."""
    # Without a cgroup namespace, /proc/self/cgroup names the path on the host while
    # the container sees its own cgroup mounted as the root: start there then.
    here = mount / path.strip("/")
    if not here.is_dir():
        here = mount
    found: list[float] = []
    while True:
        limit = read(here)
        if limit is not None:
            found.append(limit)
        if here == mount or mount not in here.parents:
            return found
        here = here.parent


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return _ratio(quota, period)


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = (folder / "cpu.cfs_quota_us").read_text(encoding="ascii").strip()
        period = (folder / "cpu.cfs_period_us").read_text(encoding="ascii").strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def available_cpus(
    *,
    affinity: int | None = None,
    root: Path = CGROUP_ROOT,
    self_cgroup: Path = SELF_CGROUP,
) -> int:
    """CPUs this process may use: its affinity, lowered to the cgroup's CPU quota
    rounded up (1.5 CPUs of quota count as 2, as the JVM and Go's runtime count them)."""
    cpus = affinity if affinity is not None else affinity_cpus()
    quota = cgroup_cpu_limit(root, self_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(cpus, 1)


def server_workers(environ: Mapping[str, str] | None = None) -> int | None:
    """How many workers the server of this process runs; None when unknown.

    A worker of Hypercorn, of ``quart-service serve`` or of Uvicorn is a
    multiprocessing child started with the server's config among its arguments
    (``Process(target=..., kwargs={"config": config, ...})``): its ``workers`` is the
    answer. Otherwise (Granian, a single-process server) ``WEB_CONCURRENCY``, which
    ``quart-service serve --server`` sets and Gunicorn and Uvicorn read, when set.
    """
    config = getattr(multiprocessing.current_process(), "_kwargs", {}).get("config")
    workers = getattr(config, "workers", None)
    if isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1:
        return workers
    env = os.environ if environ is None else environ
    try:
        declared = int(env.get(WORKERS_ENV, ""))
    except ValueError:
        return None
    return declared if declared >= 1 else None


def budget_for(setting: int, cpus: int, workers: int | None) -> int:
    """The budget: the setting when positive; else ``cpus // workers``, at least 1
    (``workers`` None counts as 1); with the setting ``OFF``, all of ``cpus``."""
    if setting > 0:
        return setting
    if setting == OFF:
        return cpus
    return max(cpus // (workers or 1), 1)


_applied: NativeBudget | None = None  # this process's caps, once applied


def cap_native_threads(
    setting: int,
    *,
    workers: int | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> NativeBudget:
    """Apply the native thread budget in this worker process, once, and return it.

    ``setting``: ``native_threads`` (0: automatic, -1: off, n: n threads).
    ``workers``: the server's worker count when the caller knows it; otherwise
    :func:`server_workers` finds it. ``environ``: the mapping to set the caps in
    (tests); by default this process's environment, and then libraries loaded already
    are limited too. A process that is no server's worker (a test
    process, a script that builds the app) gets its budget computed for one worker
    and left unapplied: its environment is not ours to change. The first application
    in a process holds for its life: libraries read the caps once, when they load.
    """
    global _applied
    if _applied is not None:
        return _applied
    env = os.environ if environ is None else environ
    workers = workers or server_workers(env)
    cpus = available_cpus()
    threads = budget_for(setting, cpus, workers)
    mode = "off" if setting == OFF else "setting" if setting > 0 else "auto"
    if workers is None or setting == OFF:
        return NativeBudget(threads, mode, cpus, workers, applied=False)
    operator_caps = {name: env[name] for name in CAP_VARIABLES if env.get(name)}
    caps = {name: str(threads) for name in CAP_VARIABLES if name not in operator_caps}
    env.update(caps)
    if environ is not None:  # a mapping of the caller's: this process's libraries stay
        return NativeBudget(threads, mode, cpus, workers, True, caps, operator_caps)
    limited = _limit_loaded(threads, operator_caps)
    _applied = NativeBudget(threads, mode, cpus, workers, True, caps, operator_caps, limited)
    return _applied


def _limit_loaded(threads: int, operator_caps: Mapping[str, str]) -> tuple[str, ...]:
    """Limit native libraries that loaded before the caps were set (threadpoolctl).
    They compute with at most ``threads`` threads from now on; a pool they started at
    load stays (OpenBLAS parks its threads), so import them after the caps."""
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    limits: dict[str, int] = {}  # by file: threadpoolctl matches a file, a prefix or a user API
    limited: set[str] = set()
    for library in controller.info():
        api = library["internal_api"]
        controlled_by = _VARIABLES_OF.get(api, ("OMP_NUM_THREADS",))
        if library["num_threads"] > threads and not any(v in operator_caps for v in controlled_by):
            limits[library["filepath"]] = threads
            limited.add(api)
    if limits:
        controller.limit(limits=limits)  # stays in force: the limiter is not restored
    return tuple(sorted(limited))


def loaded_libraries() -> list[dict[str, Any]]:
    """The native thread pools loaded in this process now (threadpoolctl's view)."""
    from threadpoolctl import threadpool_info

    return [
        {
            "library": info["internal_api"],
            "num_threads": info["num_threads"],
            "version": info.get("version"),
        }
        for info in threadpool_info()
    ]
