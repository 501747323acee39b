"""The public surface is exactly ``__all__``, and every name in it exists."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import quart_service

from .support.server import server_env

PUBLIC_MODULES = [
    "quart_service.errors",
    "quart_service.executor",
    "quart_service.factory",
    "quart_service.resources",
    "quart_service.service",
    "quart_service.settings",
    "quart_service.streaming",
    "quart_service.metrics",
    "quart_service.observe",
    "quart_service.supervisor",
]


def test_package_exports_exactly_all() -> None:
    exported = {
        name
        for name, value in vars(quart_service).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == set(quart_service.__all__) - {"__version__"}


def test_every_public_module_defines_all_and_it_resolves() -> None:
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        assert module.__all__, name
        for attribute in module.__all__:
            assert hasattr(module, attribute), f"{name}.{attribute}"


def test_importing_the_app_opens_no_thread_or_file() -> None:
    # Every spawned worker (and the test process) imports the app module: nothing may
    # start or open at import time (DESIGN.md pitfall 8).
    probe = (
        "import os, threading\n"
        "before = set(os.listdir('/proc/self/fd'))\n"
        "import quart_service.app\n"
        "after = set(os.listdir('/proc/self/fd'))\n"
        "print(threading.active_count(), len(after - before))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=server_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    threads, new_fds = map(int, result.stdout.split())
    assert threads == 1
    assert new_fds == 0
