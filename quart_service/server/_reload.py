"""Development mode's file watch: which source files changed since the last look.

``quart-service serve --reload`` polls the modification times of the Python files
(and the service's settings file) under the watched folders, at most twice a second,
and replaces the workers one at a time when one changed (the SIGHUP rolling reload):
a worker with a syntax error never takes over from one that serves. Polling needs no
extra package and no inotify limits; a tree of a few thousand files takes a few
milliseconds to scan.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["FileWatch"]

_SUFFIXES = (".py", ".toml")
# Folders no source lives in: caches, VCS, environments, the service's own data.
_SKIP = frozenset({"__pycache__", "node_modules", "data", "build", "dist", "venv", "site-packages"})
_EVERY = 0.5


class FileWatch:
    """Polls ``folders`` (recursively) and ``files`` for changes."""

    def __init__(self, folders: Iterable[Path], files: Iterable[Path] = ()) -> None:
        self.folders = sorted({folder.resolve() for folder in folders})
        self.files = sorted({file.resolve() for file in files})
        self._seen = self._scan()
        self._next = time.monotonic() + _EVERY

    def changed(self) -> list[Path]:
        """The files added, changed or removed since the last call (polled at most
        every half second; an empty list in between)."""
        now = time.monotonic()
        if now < self._next:
            return []
        self._next = now + _EVERY
        seen = self._scan()
        changed = [path for path in seen.keys() | self._seen.keys()
                   if seen.get(path) != self._seen.get(path)]  # fmt: skip
        self._seen = seen
        return sorted(changed)

    def _scan(self) -> dict[Path, tuple[int, int]]:
        found: dict[Path, tuple[int, int]] = {}
        for path in [*self._walk(), *self.files]:
            try:
                stat = path.stat()
            except OSError:
                continue  # removed meanwhile: its absence is the change
            found[path] = (stat.st_mtime_ns, stat.st_size)
        return found

    def _walk(self) -> Iterator[Path]:
        for folder in self.folders:
            for root, dirs, names in os.walk(folder):
                dirs[:] = [d for d in dirs if d not in _SKIP and not d.startswith(".")]
                for name in names:
                    if name.endswith(_SUFFIXES):
                        yield Path(root, name)
