"""How many worker processes, and how many pool threads in each: the rule the defaults follow.

A worker is one interpreter with one GIL, one event loop, one pool, one set of
singletons and one cache. Python code (the HTTP server, Quart, the service, an n-gram
model) runs on one core per worker whatever the number of threads, so only more
workers use more cores; threads only let a worker *wait* on more things at once
(blocking calls, native code that releases the GIL). docs/process-model.md
("Choosing workers and threads") has the measurements behind the rule:

* **workers = the CPUs this process may use** (affinity, lowered to the cgroup's CPU
  quota: :func:`quart_service.native_threads.available_cpus`; never
  ``os.cpu_count()``), for every workload: the HTTP layer alone is pure Python.
* **pool threads per worker** by what the pool carries (the ``workload`` setting):

  ===========  ==============================================  ========================
  ``workload`` what the pool threads do                        threads per worker
  ===========  ==============================================  ========================
  ``io``       wait: blocking I/O in plain ``def`` views, a     32
               WSGI mount; async streams and awaited calls use
               no thread at all
  ``cpu``      compute in Python, holding the GIL (n-gram       2
               sampling, parsing): one runs at a time, the rest
               queue inside the GIL and delay the event loop
  ``native``   compute in native code that releases the GIL     native budget + 1
               (numpy, onnxruntime): the budget's cores, and
               one more job preparing while another computes
  ``mixed``    some of each (the default)                       16
  ===========  ==============================================  ========================

Pool threads start lazily, so a larger bound costs nothing until work needs it;
what it changes is how much work a worker *admits* before it sheds (503) and how long
admitted work may queue.

:func:`recommend` is pure (no /proc, no settings): tests feed it core counts.
:func:`for_this_host` feeds it this process's CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .config import WORKLOADS
from .native_threads import available_cpus, budget_for

__all__ = [
    "AUTO",
    "WORKLOADS",
    "Sizing",
    "for_this_host",
    "recommend",
]

AUTO: Final = 0  # executor_threads = 0: the rule chooses

# Pool threads per worker, by workload; "native" follows the native budget.
_THREADS: Final = {"io": 32, "cpu": 2, "mixed": 16}

_WHY: Final = {
    "io": "pool threads only wait (blocking I/O): one per concurrent blocking call",
    "cpu": "Python holds the GIL: one thread computes at a time, more only queue",
    "native": "native code releases the GIL: the budget's cores plus one job preparing",
    "mixed": "blocking waits beside GIL-bound work",
}


@dataclass(frozen=True, slots=True)
class Sizing:
    """Workers and pool threads per worker, and why."""

    workers: int
    threads: int  # pool threads per worker (executor_threads)
    cpus: int
    workload: str
    workers_from: str  # "rule" or "operator"
    threads_from: str  # "rule" or "operator"

    @property
    def workers_reason(self) -> str:
        """Why this many workers."""
        cpus = _plural(self.cpus, "CPU")
        if self.workers_from == "rule":
            return f"{_plural(self.workers, 'worker')} for {cpus} (one GIL each)"
        return f"{_plural(self.workers, 'worker')} set by the operator ({cpus})"

    @property
    def threads_reason(self) -> str:
        """Why this many pool threads per worker."""
        if self.threads_from == "rule":
            return (
                f"{self.threads} pool threads each: workload {self.workload}, "
                + _WHY[self.workload]
            )
        return f"{self.threads} pool threads each (executor_threads)"

    @property
    def reason(self) -> str:
        """Why these numbers, in one line."""
        return f"{self.workers_reason}; {self.threads_reason}"

    def describe(self) -> str:
        """The start-up line: ``2 workers x 16 pool threads (...)``."""
        return f"{_plural(self.workers, 'worker')} x {self.threads} pool threads ({self.reason})"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def recommend(
    cpus: int,
    workload: str = "mixed",
    *,
    workers: int | None = None,
    threads: int = AUTO,
) -> Sizing:
    """The sizes for a host with ``cpus`` usable CPUs and a ``workload`` hint.

    ``workers``: the operator's worker count, if set (``--workers``, the server's
    file); ``threads``: the ``executor_threads`` setting (``AUTO``, 0: the rule). What
    the operator set is kept; the rest follows the rule. The ``native`` threads follow
    the native budget (``cpus // workers``, docs/process-model.md, "Native threads").
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    cpus = max(cpus, 1)
    operator_workers = workers is not None and workers >= 1
    chosen_workers = workers if workers is not None and operator_workers else cpus
    if threads > 0:
        chosen_threads, threads_from = threads, "operator"
    elif workload == "native":
        budget = budget_for(0, cpus, chosen_workers)
        chosen_threads, threads_from = budget + 1, "rule"
    else:
        chosen_threads, threads_from = _THREADS[workload], "rule"
    return Sizing(
        workers=chosen_workers,
        threads=chosen_threads,
        cpus=cpus,
        workload=workload,
        workers_from="operator" if operator_workers else "rule",
        threads_from=threads_from,
    )


def for_this_host(
    workload: str = "mixed", *, workers: int | None = None, threads: int = AUTO
) -> Sizing:
    """:func:`recommend` for the CPUs this process may use (affinity, cgroup quota)."""
    return recommend(available_cpus(), workload, workers=workers, threads=threads)
