"""wrk as a bench's load generator, and the CPU a server's workers spent meanwhile.

The steady number on a shared machine is the workers' CPU time per request (utime +
stime from /proc), not requests/s; wrk's own CPU is counted too, as it shares the
cores with the workers.
"""

from __future__ import annotations

import contextlib
import math
import re
import resource
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.support.server import Server, peak_threads


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # USER_HZ is 100 on Linux


@dataclass(frozen=True)
class WrkRun:
    """What one wrk run did."""

    completed: int  # requests
    cpu: float  # wrk's own CPU seconds (utime + stime)
    p99_ms: float  # the 99th percentile latency; NaN unless asked for (latency=True)


def wrk(url: str, seconds: float, connections: int, *, latency: bool = False) -> WrkRun:
    """One ``wrk -t2`` run of ``seconds`` on ``connections`` connections; it fails
    on any non-2xx/3xx answer. ``latency``: ``--latency``, for the p99."""
    flags = ["--latency"] if latency else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{round(seconds)}s", *flags, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = re.search(r"(\d+) requests in", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    if completed is None or (latency and p99 is None):
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    if errors := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"{url}: {errors.group(1)} failed responses")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return WrkRun(int(completed.group(1)), cpu, _ms(p99.group(1)) if p99 else math.nan)


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


@dataclass(frozen=True)
class Measured:
    """One timed wrk run against a server, and what its workers spent meanwhile."""

    run: WrkRun
    elapsed: float  # seconds of the run, as this process timed it
    worker_cpu: list[float]  # CPU seconds of each worker over the run
    peak_threads: int  # the most threads any worker had (0: not sampled)

    @property
    def busiest(self) -> float:
        """The busiest worker's share of the workers' CPU time (docs/design.md,
        pitfall 3: with asyncio workers one worker may take every connection)."""
        total = sum(self.worker_cpu)
        return max(self.worker_cpu) / total if total else 0.0


def measure_wrk(
    server: Server,
    route: str,
    seconds: float,
    connections: int,
    *,
    latency: bool = False,
    threads: bool = True,
    meanwhile: Callable[[], object] | None = None,
) -> Measured:
    """A 1 s wrk run to warm up (imports, first-use paths in every worker), then the
    timed one on ``route``. ``threads``: sample the workers' peak thread count every
    0.05 s; ``meanwhile``: called in a thread as the timed run starts, joined after."""
    pids = server.worker_pids()
    url = server.url + route
    wrk(url, 1, connections, latency=latency)
    sampling: contextlib.AbstractContextManager[dict[int, int]] = (
        peak_threads(pids, every=0.05) if threads else contextlib.nullcontext({})
    )
    beside = threading.Thread(target=meanwhile) if meanwhile is not None else None
    with sampling as peak:
        cpu_before, started = [cpu_seconds(p) for p in pids], time.monotonic()
        if beside is not None:
            beside.start()
        run = wrk(url, seconds, connections, latency=latency)
        elapsed = time.monotonic() - started
        cpu = [cpu_seconds(p) - before for p, before in zip(pids, cpu_before, strict=True)]
    if beside is not None:
        beside.join()
    return Measured(run, elapsed, cpu, max(peak.values(), default=0))
