"""Coordination between the workers of one host, through files.

* :class:`LeaderLock` — an exclusive ``flock`` on a lock file. Whoever holds it is the
  leader; the kernel releases it when the holder dies (even by SIGKILL), and the next
  worker that tries takes over.
* :class:`PublishedFile` — a small file replaced atomically (write a temporary file,
  then ``os.replace``). Readers notice a new version with one ``stat`` (inode,
  size, mtime), without reading it or touching the database.

All calls are quick local syscalls; they run on the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

__all__ = ["LeaderLock", "PublishedFile"]


class LeaderLock:
    """A non-blocking, process-wide exclusive lock on ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        # For operators: who leads now (informative; the lock is what counts).
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases the flock)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class PublishedFile:
    """A file that one writer replaces atomically and many readers poll by ``stat``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None

    def publish(self, text: str) -> None:
        """Replace the file's content in one step: readers see old or new, never half."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, self.path)
            self._seen = self._stamp()  # the writer knows what it wrote
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def read(self) -> str | None:
        """The current content, or None if nothing was published yet."""
        try:
            stamp = self._stamp()
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        self._seen = stamp
        return text

    def read_if_changed(self) -> str | None:
        """The content if the file changed since the last read, else None (one stat)."""
        try:
            stamp = self._stamp()
        except FileNotFoundError:
            return None
        if stamp == self._seen:
            return None
        return self.read()

    def forget(self) -> None:
        """Forget what was read, so the next :meth:`read_if_changed` reads again."""
        self._seen = None

    def _stamp(self) -> tuple[int, int, int]:
        # os.replace gives a new inode, so the stamp changes even within one mtime tick.
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns)
