"""Facts about a process read from /proc/PID/status (Linux), for identity endpoints."""

from __future__ import annotations

import os

__all__ = ["rss_bytes", "thread_count"]


def _status_field(field: str, pid: int | None) -> int:
    try:
        with open(f"/proc/{pid or os.getpid()}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def thread_count(pid: int | None = None) -> int:
    """Threads of ``pid`` (this process by default); -1 where /proc is missing."""
    return _status_field("Threads:", pid)


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of ``pid`` in bytes; -1 where /proc is missing."""
    kib = _status_field("VmRSS:", pid)
    return kib * 1024 if kib >= 0 else -1
