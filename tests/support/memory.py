"""A process's memory from /proc (Linux): totals and the share of one mapped file.

PSS (proportional set size) counts a page shared by N processes as 1/N in each, so
summed over processes it counts every page once; RSS counts it in full in each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

KIB = 1024


@dataclass(frozen=True)
class Memory:
    """Bytes, from /proc/PID/smaps_rollup."""

    rss: int
    pss: int
    anonymous: int  # private to the process (heap, copies), never shared with others


def memory(pid: int) -> Memory:
    """``pid``'s RSS, PSS and anonymous memory."""
    fields = _fields(Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines())
    return Memory(fields["Rss"], fields["Pss"], fields["Anonymous"])


def file_mapping(pid: int, path: Path) -> Memory:
    """What ``pid``'s mappings of the file ``path`` hold resident (from /proc/PID/smaps)."""
    target = str(Path(path).resolve())
    rss = pss = anonymous = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            # A mapping's header: address perms offset dev inode [pathname]
            inside = len(head) == 6 and head[5] == target
            continue
        if inside:
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss", "Anonymous"):
                amount = int(value.split()[0]) * KIB
                rss += amount if key == "Rss" else 0
                pss += amount if key == "Pss" else 0
                anonymous += amount if key == "Anonymous" else 0
    return Memory(rss, pss, anonymous)


@dataclass(frozen=True)
class Loading:
    """What loading a model in each worker, one worker after the other, did to their
    memory (bytes; by worker pid)."""

    before: dict[int, Memory]
    after: dict[int, Memory]
    mapped: dict[int, Memory]  # each worker's mapping of the weights file, after
    alone: int  # the PSS the first worker gained, loading the model while no other had it

    @property
    def together(self) -> int:
        """The PSS all the workers gained together."""
        return sum(self.after[pid].pss - self.before[pid].pss for pid in self.after)


def load_one_by_one(workers: Sequence[int], load: Callable[[int], None], weights: Path) -> Loading:
    """Run ``load(pid)`` for each of ``workers`` in turn (it must make that worker load the
    model in ``weights`` and use it), measuring their memory before, after the first
    alone, and after all of them."""
    before = {pid: memory(pid) for pid in workers}
    first, *others = workers
    load(first)
    alone = memory(first).pss - before[first].pss
    for pid in others:
        load(pid)
    after = {pid: memory(pid) for pid in workers}
    mapped = {pid: file_mapping(pid, weights) for pid in workers}
    return Loading(before, after, mapped, alone)


def _fields(lines: list[str]) -> dict[str, int]:
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0]) * KIB
    return fields
