"""A process that runs only the data plane's election and refresh, for failover tests.

    python -m tests.apps.elector DATA_DIR INTERVAL EVENTS_FILE

It uses the same DataPlane as a worker, so killing it with SIGKILL is killing a
leader, without Hypercorn (which stops the whole server when one worker dies).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from quart_service.data.migrations import apply_migrations
from quart_service.data.models import MODELS
from quart_service.data.plane import DataPlane
from quart_service.data.sqlite import SQLiteDatabase


async def main(data_dir: Path, interval: float, events: Path) -> None:
    def record(kind: str, **fields: object) -> None:
        line = json.dumps({"kind": kind, "pid": os.getpid(), "t": time.time(), **fields})
        with events.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    database_file = data_dir / "quart_service.db"
    apply_migrations(database_file)
    database = SQLiteDatabase(database_file, 5.0)
    plane = DataPlane(data_dir, interval, database, [MODELS])
    plane.on_swap(
        lambda old, new: record("swap", generation=new.generation, versions=new.versions())
    )
    runner = asyncio.create_task(plane.run())
    record("started")
    role = ""
    while not runner.done():
        if plane.role != role:
            role = plane.role
            record("role", role=role)
        await asyncio.sleep(0.01)
    await runner


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])))
