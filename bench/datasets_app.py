"""The app ``bench.datasets`` serves: one large dataset and two light routes.

* ``GET /ds/version`` — the version and row count this worker serves (reads no row);
* ``GET /ds/scan``    — reads every row of that version (sums ``weight``), so each
  page of the memory-mapped file is faulted into this worker.

Settings come from the environment (``QUART_SERVICE_DATA_DIR``,
``QUART_SERVICE_REFRESH_INTERVAL``...). The table ``big_rows`` must exist before the
server starts; the service installs its revision triggers itself.
"""

from __future__ import annotations

import os
import time
from typing import Any

from quart import Blueprint

from quart_service import Dataset, create_app, dataset

BIG: Dataset[None] = Dataset(
    "big",
    tables=["big_rows"],
    query="SELECT id, name, payload, weight FROM big_rows",
    key="id",
)

bp = Blueprint("datasets_bench", __name__)


@bp.get("/ds/version")
async def version() -> dict[str, Any]:
    view = await dataset(BIG)
    return {"pid": os.getpid(), "version": view.version, "rows": len(view)}


@bp.get("/ds/scan")
async def scan() -> dict[str, Any]:
    # Blocks this worker's loop while it reads (a bench route: nothing else runs here).
    view = await dataset(BIG)
    started = time.perf_counter()
    total = 0.0
    rows = 0
    for row in view:
        total += row["weight"]
        rows += 1
    return {
        "pid": os.getpid(),
        "version": view.version,
        "rows": rows,
        "sum": total,
        "seconds": time.perf_counter() - started,
    }


app = create_app(datasets=[BIG], blueprints=[bp])
