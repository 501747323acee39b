"""Helpers for data-plane tests and benches: change rows, watch every worker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from .server import sqlite3_shell


def put_model(database: Path, name: str, parameters: dict[str, Any]) -> None:
    """Insert or update a model row with the sqlite3 shell, as an operator would."""
    params = json.dumps(parameters).replace("'", "''")
    sqlite3_shell(
        database,
        f"INSERT INTO models (name, engine, parameters) VALUES ('{name}', 'local', '{params}') "
        "ON CONFLICT (name) DO UPDATE SET parameters = excluded.parameters",
    )


def wait_all(
    clients: dict[int, httpx.Client],
    path: str,
    done: Callable[[Any], bool],
    timeout: float,
) -> dict[int, float]:
    """Poll every worker until ``done(answer)``; seconds until each one got there."""
    started = time.monotonic()
    reached: dict[int, float] = {}
    while len(reached) < len(clients) and time.monotonic() - started < timeout:
        for pid, client in clients.items():
            if pid not in reached and done(client.get(path).json()):
                reached[pid] = time.monotonic() - started
        time.sleep(0.005)
    if len(reached) < len(clients):
        raise AssertionError(
            f"{path}: only workers {sorted(reached)} of {sorted(clients)} met the condition "
            f"within {timeout} s"
        )
    return reached
