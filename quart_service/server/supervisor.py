"""``quart-service serve``: Hypercorn's workers, supervised.

Plain ``hypercorn`` stops the whole server when one worker crashes (``run()`` in
hypercorn/run.py, 0.18; docs/design.md, pitfall 2), and its SIGHUP stops every worker
at once. The supervisor runs the same Hypercorn worker code and adds:

* each worker accepts on its own ``SO_REUSEPORT`` socket, so the kernel spreads new
  connections over the workers (see :mod:`quart_service.server._sockets`; the shared
  socket of plain ``hypercorn`` with ``socket_per_worker=False``);
* a worker that dies, however (a crash, ``kill -9``, the OOM killer), is replaced at
  once while the others keep serving;
* a worker that dies before it serves is retried with backoff (0.5 s, 1 s, 2 s, ...),
  and after ``max_start_failures`` in a row the supervisor gives up with one clear
  message and exit code 1, instead of restarting in a tight loop;
* a worker that stops accepting on its own (SIGTERM sent to it alone, Hypercorn's
  ``max_requests``) is replaced as soon as it says so, not after its drain;
* SIGTERM (or Ctrl-C) drains every worker (see :mod:`quart_service.drain`) and exits
  0; a second one kills at once;
* SIGHUP replaces the workers one at a time: a new worker is serving before an old
  one starts to drain, so no request fails and code or settings changes go live;
* in development mode (``watch``: ``serve --reload``), a changed source file does
  what SIGHUP does; a new worker that fails to start (a syntax error) leaves the old
  ones serving and does not count towards giving up: the next save tries again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from hypercorn.config import Config
from prometheus_client import Counter

from ..observability.metrics import forget_process
from ._reload import FileWatch
from ._sockets import Listeners
from .worker import READY, STOPPING, run_worker

__all__ = ["Supervisor"]

_log = logging.getLogger("quart_service.serve")

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_KILL_MARGIN = 5.0  # beyond the drain and Hypercorn's graceful timeout


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    pipe: Connection  # the worker says READY, then STOPPING
    spawned_at: float
    slot: int  # which of the listening sockets it accepts on
    replaces: _Worker | None = None
    ready: bool = False
    retiring: bool = False
    pipe_closed: bool = False
    kill_at: float | None = None

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid


class Supervisor:
    """Keeps ``config.workers`` Hypercorn workers serving ``config.application_path``."""

    def __init__(
        self,
        config: Config,
        *,
        drain_timeout: float,
        max_start_failures: int = 5,
        count_metrics: bool = False,
        socket_per_worker: bool = True,
        watch: FileWatch | None = None,
    ) -> None:
        self.config = config
        self.watch = watch
        self.listeners = Listeners(config, config.workers, per_worker=socket_per_worker)
        self.drain_timeout = drain_timeout
        self.max_start_failures = max_start_failures
        # Only this counter: the supervisor serves nothing, so it has no other metric.
        self._restarts = (
            Counter(
                "quart_service_worker_restarts",
                "Workers started by 'quart-service serve' to replace others, by "
                "reason: crashed, startup_failed, reload, stopped.",
                ["reason"],
                registry=None,
            )
            if count_metrics
            else None
        )
        self.workers: list[_Worker] = []
        self.exit_code = 0
        self._ctx = get_context("spawn")
        self._failures = 0  # workers in a row that died before serving
        self._next_spawn = 0.0
        self._reload_queue: list[_Worker] = []
        self._stop = self._kill = self._reload = False
        self._wake_r, self._wake_w = os.pipe()

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code."""
        try:
            self.listeners.open()
        except OSError as exc:
            _log.critical("cannot listen on %s: %s", ", ".join(self.config.bind), exc)
            return 1
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        _log.info(
            "supervisor %d: serving %s with %d workers on %s (%s)",
            os.getpid(),
            self.config.application_path,
            self.config.workers,
            ", ".join(self.config.bind),
            "a listening socket per worker"
            if self.listeners.per_worker
            else "one shared listening socket",
        )
        if self.watch is not None:
            _log.warning(
                "development mode: workers are replaced when a .py file changes under %s",
                ", ".join(map(str, self.watch.folders)),
            )
        try:
            while not self._stop:
                self._step()
            return self._shut_down()
        finally:
            self.listeners.close()

    def _step(self) -> None:
        self._reap()
        self._read_pipes()
        if self._stop:
            return
        if self.watch is not None:
            changed = self.watch.changed()
            if changed:
                more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
                _log.info("reload: %s changed%s", changed[0], more)
                self._reload = True
        if self._reload:
            self._reload = False
            self._begin_reload()
        self._advance_reload()
        self._fill()
        self._kill_overdue()
        self._wait()

    # -- events -------------------------------------------------------------------------

    def _reap(self) -> None:
        for worker in [w for w in self.workers if w.process.exitcode is not None]:
            self.workers.remove(worker)
            worker.process.join()
            worker.pipe.close()
            code = worker.process.exitcode
            forget_process(worker.pid)  # its live gauges no longer count
            if worker.retiring:
                _log.info("worker %d retired (%s)", worker.pid, _describe(code))
            elif worker.ready:
                _log.error(
                    "worker %d died (%s); starting a replacement", worker.pid, _describe(code)
                )
                self._count_restart("crashed")
            else:
                self._start_failed(worker, code)

    def _start_failed(self, worker: _Worker, code: int | None) -> None:
        if self.watch is not None and worker.replaces is not None:
            # Development mode: the old workers serve on; the next save tries again.
            _log.error(
                "reload: the new worker %d exited before serving (%s); the old ones "
                "keep serving. Its own log lines above say why.",
                worker.pid,
                _describe(code),
            )
            self._reload_queue.clear()
            return
        self._failures += 1
        self._count_restart("startup_failed")
        if worker.replaces is not None:
            _log.error("reload stopped: a new worker failed to start; the old ones keep serving")
            self._reload_queue.clear()
        if self._failures >= self.max_start_failures:
            _log.critical(
                "giving up: %d workers in a row exited before serving (the last: %s). "
                "Their own log lines above say why; 'quart-service check' validates "
                "the settings.",
                self._failures,
                _describe(code),
            )
            self.exit_code = 1
            self._stop = True
            return
        delay = min(_BACKOFF_FIRST * 2 ** (self._failures - 1), _BACKOFF_MAX)
        self._next_spawn = time.monotonic() + delay
        _log.error(
            "worker %d exited before serving (%s); %d in a row, next try in %.1f s",
            worker.pid,
            _describe(code),
            self._failures,
            delay,
        )

    def _read_pipes(self) -> None:
        for worker in list(self.workers):
            # At most READY and STOPPING, then the end of the pipe.
            while not (worker.retiring or worker.pipe_closed) and worker.pipe.poll():
                try:
                    message = worker.pipe.recv_bytes()
                except (EOFError, OSError):
                    worker.pipe_closed = True  # it exited: _reap sees it
                    break
                if message == READY:
                    self._serving(worker)
                elif message == STOPPING and worker.ready:
                    self._stopped_on_its_own(worker)

    def _serving(self, worker: _Worker) -> None:
        worker.ready = True
        self._failures = 0
        _log.info(
            "worker %d serving (started in %.2f s)",
            worker.pid,
            time.monotonic() - worker.spawned_at,
        )
        if worker.replaces is not None:
            self._retire(worker.replaces)

    def _stopped_on_its_own(self, worker: _Worker) -> None:
        # Its socket stays open here, queued connections and all, and its
        # replacement accepts on it: start that now, not after the drain.
        _log.warning(
            "worker %d stopped accepting on its own (a SIGTERM to it alone, or "
            "max_requests); starting its replacement",
            worker.pid,
        )
        self._count_restart("stopped")
        worker.retiring = True
        worker.kill_at = time.monotonic() + self._drain_limit()

    # -- actions ------------------------------------------------------------------------

    def _fill(self) -> None:
        for slot in range(self.config.workers):
            if any(w.slot == slot and not w.retiring for w in self.workers):
                continue
            # Failing to start: one attempt at a time, after the backoff.
            if self._failures and (
                time.monotonic() < self._next_spawn
                or any(not w.ready and not w.retiring for w in self.workers)
            ):
                self._release(slot)
                continue
            self._spawn(slot)

    def _release(self, slot: int) -> None:
        """Nobody will accept on the slot's socket for a while (the backoff): give it
        a fresh one, so new connections go to the workers that serve meanwhile."""
        if any(w.slot == slot for w in self.workers) or not self.listeners.listening(slot):
            return
        try:
            self.listeners.renew(slot)
        except OSError as exc:
            _log.error("cannot reopen the listening socket of worker slot %d: %s", slot, exc)
            return
        _log.warning(
            "no worker accepts on the socket of worker slot %d until the next start: "
            "reopened it (connections waiting in it were reset)",
            slot,
        )

    def _spawn(self, slot: int, replaces: _Worker | None = None) -> _Worker:
        reader, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=run_worker,
            kwargs={
                "config": self.config,
                "sockets": self.listeners.for_slot(slot),
                "ready": writer,
            },
            name="quart-service-worker",
        )
        process.start()
        writer.close()  # the worker holds its own copy
        worker = _Worker(process, reader, time.monotonic(), slot, replaces=replaces)
        self.workers.append(worker)
        return worker

    def _begin_reload(self) -> None:
        self._reload_queue = [w for w in self.workers if not w.retiring]
        _log.info("SIGHUP: replacing %d workers one at a time", len(self._reload_queue))

    def _advance_reload(self) -> None:
        if any(w.replaces is not None and not w.ready for w in self.workers):
            return  # the current replacement is still starting
        while self._reload_queue:
            old = self._reload_queue.pop(0)
            if old in self.workers and not old.retiring:
                self._count_restart("reload")
                self._spawn(old.slot, replaces=old)
                return
        self._reload_queue.clear()

    def _retire(self, worker: _Worker) -> None:
        if worker.retiring or worker not in self.workers:
            return
        worker.retiring = True
        worker.kill_at = time.monotonic() + self._drain_limit()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGTERM)

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.kill_at is not None and now >= worker.kill_at:
                _log.warning("worker %d did not finish draining; killing it", worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                worker.kill_at = None

    def _wait(self) -> None:
        timeout = 1.0
        if self._failures and self._next_spawn > time.monotonic():
            timeout = min(timeout, self._next_spawn - time.monotonic())
        waitables: list[object] = [self._wake_r]
        for worker in self.workers:
            waitables.append(worker.process.sentinel)
            if not (worker.retiring or worker.pipe_closed):
                waitables.append(worker.pipe)
        wait(waitables, timeout)  # type: ignore[arg-type]
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)

    def _shut_down(self) -> int:
        _log.info(
            "stopping %d workers (open streams get up to %g s)",
            len(self.workers),
            self.drain_timeout,
        )
        for worker in self.workers:
            self._retire(worker)
        killed = False
        deadline = time.monotonic() + self._drain_limit()
        while self.workers:
            if self._kill or time.monotonic() >= deadline:
                for worker in self.workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
                killed = True
                _log.warning("killed %d workers that were still draining", len(self.workers))
                self._kill = False
                deadline = float("inf")
            self._wait()
            self._reap()
        _log.info("supervisor %d: stopped", os.getpid())
        return self.exit_code or (1 if killed else 0)

    def _drain_limit(self) -> float:
        return self.drain_timeout + float(self.config.graceful_timeout) + _KILL_MARGIN

    # -- bookkeeping --------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        if self._stop:
            self._kill = True  # a second Ctrl-C / SIGTERM: do not wait
        self._stop = True

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True

    def _count_restart(self, reason: str) -> None:
        if self._restarts is not None:
            self._restarts.labels(reason).inc()


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
