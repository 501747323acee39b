"""Event counts moved by one call: the Prometheus child and this process's tally.

A part of the service counts an event once (``count.inc()``); the Prometheus child is
what ``/metrics`` sums over every worker, the tally is what ``/debug/identity`` shows
for this worker. Built without a family (``Count()``, ``Counts()``), they only tally:
that is how a part built outside a serving worker (a unit test) counts.

A count on a hot path may defer its metric: ``add()`` tallies at once and the metric
moves at the next ``flush()``. A Prometheus child in multiprocess mode costs about
3-5 µs per update (a lock, a pid check, an mmap write), which a stream paid several
times over; its owner flushes on a clock instead.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

__all__ = ["Count", "Counts", "Observations"]


class Count:
    """One event count."""

    __slots__ = ("_child", "_pending", "value")

    def __init__(self, child: Any = None) -> None:
        self.value: int | float = 0
        self._pending: int | float = 0
        self._child = child

    def inc(self, amount: int | float = 1) -> None:
        """Count ``amount`` more events."""
        self.value += amount
        if self._child is not None:
            self._child.inc(amount)

    def add(self, amount: int | float = 1) -> None:
        """Count ``amount`` more events now; the metric moves at :meth:`flush`."""
        self.value += amount
        self._pending += amount

    def flush(self) -> None:
        """Move what :meth:`add` counted to the metric."""
        if self._pending:
            if self._child is not None:
                self._child.inc(self._pending)
            self._pending = 0


class Counts:
    """A family of counts with one label (a reason, a kind, an outcome)."""

    __slots__ = ("_counts", "_family")

    def __init__(self, family: Any = None) -> None:
        self._family = family
        self._counts: dict[str, Count] = {}

    def __getitem__(self, label: str) -> Count:
        count = self._counts.get(label)
        if count is None:
            child = self._family.labels(label) if self._family is not None else None
            count = self._counts[label] = Count(child)
        return count

    def inc(self, label: str, amount: int | float = 1) -> None:
        """Count ``amount`` more events under ``label``."""
        self[label].inc(amount)

    def add(self, label: str, amount: int | float = 1) -> None:
        """Count ``amount`` more events under ``label``; the metric moves at flush."""
        self[label].add(amount)

    def flush(self) -> None:
        """Move what :meth:`add` counted to the metrics."""
        for count in self._counts.values():
            count.flush()

    def as_dict(self) -> dict[str, int | float]:
        """The tallies by label."""
        return {label: count.value for label, count in self._counts.items()}

    def total(self) -> int | float:
        """The sum over every label."""
        return sum(count.value for count in self._counts.values())


class Observations:
    """Observations of one Prometheus histogram child, moved to it at :meth:`flush`.

    ``observe`` costs a bisect and two additions; the child's own ``observe`` writes
    its sum and a bucket through to the shared file (two locked mmap writes) on
    every request. The flush adds each bucket's count and the sum to the child's
    values (prometheus-client keeps per-bucket counts, summed into cumulative ones
    when collected, so adding ``n`` to a bucket is ``n`` observations in it).
    """

    __slots__ = ("_bounds", "_buckets", "_child", "_counts", "_pending", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        # The child's upper bounds, the last one +Inf: an observation falls in the
        # first bucket whose bound is at least the value (as the child's observe).
        self._bounds: list[float] = list(child._upper_bounds)
        self._buckets: list[Any] = child._buckets
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._pending = False

    def observe(self, value: float) -> None:
        """Record one observation; the histogram moves at :meth:`flush`."""
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value
        self._pending = True

    def flush(self) -> None:
        """Move the observations recorded since the last flush to the histogram."""
        if not self._pending:
            return
        counts, self._counts = self._counts, [0] * len(self._bounds)
        total, self._sum = self._sum, 0.0
        self._pending = False
        self._child._sum.inc(total)
        for bucket, count in zip(self._buckets, counts, strict=True):
            if count:
                bucket.inc(count)
