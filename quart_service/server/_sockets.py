"""The listening sockets of ``quart-service serve``: one TCP socket per worker slot.

Workers that accept on one shared socket get unequal shares of its connections (a
worker that wakes first accepts a whole burst; docs/design.md, pitfall 3). Here each
worker *slot* has its own ``SO_REUSEPORT`` socket bound to the same address, so the
kernel hashes every new connection to one of them: the split follows the hash, not
who woke first.

Who holds what, and why:

* The supervisor binds everything before any worker starts, so a port in use fails
  at once with one clear message. Hypercorn's own sockets (``Config.create_sockets``)
  stay open in the supervisor, bound and never listening: they keep the port
  reserved (no other user can bind it: ``SO_REUSEPORT`` groups need the same
  effective UID) and serve ``unix:`` and ``fd://`` binds and QUIC, which stay shared.
* A slot's socket is bound by the supervisor and starts listening only when a worker
  serves on it (Hypercorn's ``start_server`` calls ``listen``), so a starting worker
  gets no connection before it can answer.
* The supervisor keeps its copy of every slot's socket, and a worker that replaces
  another (rolling restart, crash) gets the same socket. Closing the last copy of a
  listening socket resets the connections still queued in its accept backlog (the
  kernel does not move them to the other sockets of the group unless
  ``net.ipv4.tcp_migrate_req`` is set); a draining worker therefore only closes
  *its* copy, and the socket, with its queue, lives on in the worker that took over.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass

from hypercorn.config import Config, Sockets

__all__ = ["Listeners"]


@dataclass(frozen=True)
class _Own:
    """A TCP bind that gets one socket per slot: which list of ``Sockets``, where."""

    kind: str  # "secure_sockets" or "insecure_sockets"
    index: int


class Listeners:
    """The sockets of a ``serve`` supervisor for ``slots`` workers; ``per_worker``:
    one ``SO_REUSEPORT`` socket per slot for TCP binds (when there is more than one
    slot and the platform has ``SO_REUSEPORT``), else Hypercorn's shared sockets."""

    def __init__(self, config: Config, slots: int, *, per_worker: bool = True) -> None:
        self.config = config
        self.slots = slots
        self.per_worker = per_worker and slots > 1 and hasattr(socket, "SO_REUSEPORT")
        self._shared: Sockets | None = None
        self._own: list[_Own] = []
        self._by_slot: list[Sockets] = []

    def open(self) -> None:
        """Bind every address; raises ``OSError`` (nothing left open) when one is
        taken, also when another process of this user shares it by ``SO_REUSEPORT``
        (a second server started by mistake would otherwise take half the traffic)."""
        for host, port in _tcp_addresses(self.config):
            if port != 0:
                _probe(host, port)
        shared = self.config.create_sockets()
        self._shared = shared
        try:
            if self.per_worker:
                self._own = _own_binds(self.config)
                self.per_worker = bool(self._own)
            for _ in range(self.slots):
                mine = Sockets(
                    list(shared.secure_sockets),
                    list(shared.insecure_sockets),
                    list(shared.quic_sockets),
                )
                self._by_slot.append(mine)
                for own in self._own:
                    template = getattr(shared, own.kind)[own.index]
                    getattr(mine, own.kind)[own.index] = _socket_like(template)
        except OSError:
            self.close()
            raise

    def for_slot(self, slot: int) -> Sockets:
        """The sockets the worker of ``slot`` serves on."""
        return self._by_slot[slot]

    def listening(self, slot: int) -> bool:
        """Whether one of the slot's own sockets is listening (a worker served on it),
        so the kernel queues connections there."""
        return any(
            getattr(self._by_slot[slot], own.kind)[own.index].getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            )
            for own in self._own
        )

    def renew(self, slot: int) -> None:
        """Give the slot fresh, not yet listening sockets, and close the supervisor's
        copy of the old ones: for a slot nobody will accept on for a while, so the
        kernel sends new connections to the other slots meanwhile. Connections queued
        in the old socket are reset once no process holds it any more."""
        mine = self._by_slot[slot]
        for own in self._own:
            sockets = getattr(mine, own.kind)
            old = sockets[own.index]
            sockets[own.index] = _socket_like(old)  # bound before the old one goes
            old.close()

    def close(self) -> None:
        """Close every socket the supervisor holds."""
        seen: set[int] = set()
        groups = [*self._by_slot, *([self._shared] if self._shared else [])]
        for group in groups:
            for sock in [*group.secure_sockets, *group.insecure_sockets, *group.quic_sockets]:
                if id(sock) not in seen:
                    seen.add(id(sock))
                    sock.close()
        self._by_slot.clear()
        self._shared = None


def _own_binds(config: Config) -> list[_Own]:
    """The binds that get a socket per slot: TCP addresses (not ``unix:`` paths or
    inherited ``fd://`` sockets, which stay shared; QUIC stays shared too)."""
    if config.ssl_enabled:
        lists = [("secure_sockets", config.bind), ("insecure_sockets", config.insecure_bind)]
    else:
        lists = [("insecure_sockets", config.bind)]
    return [
        _Own(kind, index)
        for kind, binds in lists
        for index, bind in enumerate(binds)
        if not bind.startswith(("unix:", "fd://"))
    ]


def _tcp_addresses(config: Config) -> list[tuple[str, int]]:
    """Host and port of every TCP bind, parsed as ``Config._create_sockets`` does."""
    binds = [*config.bind, *(config.insecure_bind if config.ssl_enabled else [])]
    addresses = []
    for bind in binds:
        if bind.startswith(("unix:", "fd://")):
            continue
        bare = bind.replace("[", "").replace("]", "")
        try:
            host, port = bare.rsplit(":", 1)
            addresses.append((host, int(port)))
        except ValueError:
            addresses.append((bare, 8000))
    return addresses


def _probe(host: str, port: int) -> None:
    """Bind ``host:port`` without ``SO_REUSEPORT`` and let go: this fails when any
    socket holds the address, also one of this user's with ``SO_REUSEPORT``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Sockets in TIME_WAIT from a previous run do not count as "in use".
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def _socket_like(template: socket.socket) -> socket.socket:
    """A new TCP socket bound, with ``SO_REUSEPORT``, to the address of ``template``
    (a socket of Hypercorn's, which set that option too), with Hypercorn's options."""
    sock = socket.socket(template.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if template.family == socket.AF_INET6:
            v6only = template.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        sock.bind(template.getsockname())
        sock.setblocking(False)
        sock.set_inheritable(True)
    except OSError:
        with contextlib.suppress(OSError):
            sock.close()
        raise
    return sock
