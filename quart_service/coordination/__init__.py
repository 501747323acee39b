"""Coordination between worker processes: leader lock and published files."""

from .local import LeaderLock, PublishedFile

__all__ = ["LeaderLock", "PublishedFile"]
