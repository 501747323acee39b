"""The listening sockets of ``quart-service serve``, with real sockets on loopback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypercorn.config import Config

from quart_service.server._sockets import Listeners


def _config(*binds: str, workers: int = 2) -> Config:
    config = Config()
    config.bind = list(binds)
    config.workers = workers
    return config


def test_each_slot_gets_its_own_socket_on_the_same_port(tmp_path: Path) -> None:
    path = tmp_path / "serve.sock"
    listeners = Listeners(_config("127.0.0.1:0", f"unix:{path}"), 2)
    listeners.open()
    try:
        assert listeners.per_worker
        (tcp0, unix0), (tcp1, unix1) = (
            listeners.for_slot(slot).insecure_sockets for slot in (0, 1)
        )
        assert tcp0 is not tcp1
        assert tcp0.getsockname() == tcp1.getsockname()  # port 0 resolved once
        assert tcp0.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        assert unix0 is unix1  # unix: binds stay shared
        # Listening starts with the worker that serves on the socket.
        assert not listeners.listening(0)
        tcp0.listen()
        assert listeners.listening(0)
        assert not listeners.listening(1)
        address = tcp0.getsockname()
        listeners.renew(0)
        fresh = listeners.for_slot(0).insecure_sockets[0]
        assert fresh is not tcp0
        assert fresh.getsockname() == address
        assert tcp0.fileno() == -1  # the supervisor's copy is closed
        assert not listeners.listening(0)
    finally:
        listeners.close()
    assert fresh.fileno() == -1
    assert tcp1.fileno() == -1


def test_shared_sockets_when_asked_or_with_one_worker() -> None:
    for listeners in (
        Listeners(_config("127.0.0.1:0"), 2, per_worker=False),
        Listeners(_config("127.0.0.1:0", workers=1), 1),
    ):
        listeners.open()
        try:
            assert not listeners.per_worker
            slots = [listeners.for_slot(slot) for slot in range(listeners.slots)]
            assert all(s.insecure_sockets == slots[0].insecure_sockets for s in slots)
        finally:
            listeners.close()


def test_a_port_another_socket_holds_is_refused_even_with_so_reuseport() -> None:
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        listeners = Listeners(_config(f"127.0.0.1:{port}"), 2)
        with pytest.raises(OSError, match="in use"):
            listeners.open()
