"""How long an admin write takes to answer, now that it answers once every worker of
the host serves it, and the CPU it costs.

    python -m bench.admin_writes [--writes 20] [--workers 2]

Against a real server on the default ``refresh_interval`` (2 s): ``--writes`` models
each created, changed and deleted; the median and the worst answer time of each
method, the ``X-Model-Visible`` values seen, the workers' CPU per write (user +
system, from /proc, all workers summed: the poll, the load and every worker's swap)
and this client's own.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import psutil

from tests.support.server import running_server

TOKEN = "bench-admin"


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += float(times.user) + float(times.system)
    return total


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    env = {"QUART_SERVICE_ADMIN_TOKEN": TOKEN, "QUART_SERVICE_ACCESS_LOG": "0"}
    with (
        tempfile.TemporaryDirectory() as folder,
        running_server(
            Path(folder), app="quart_service.app:app", workers=args.workers, env=env
        ) as server,
        httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        ) as client,
    ):
        workers = [psutil.Process(pid) for pid in server.worker_pids()]
        client.get("/admin/models").raise_for_status()
        times: dict[str, list[float]] = {"POST": [], "PATCH": [], "DELETE": []}
        visible: set[str] = set()
        cpu, own = _cpu(workers), _own_cpu()
        for n in range(args.writes):
            calls: list[tuple[str, str, Any]] = [
                ("POST", "/admin/models", {"name": f"m{n}", "engine": "local"}),
                ("PATCH", f"/admin/models/m{n}", {"parameters": {"order": 2}}),
                ("DELETE", f"/admin/models/m{n}", None),
            ]
            for method, path, body in calls:
                started = time.perf_counter()
                answer = client.request(method, path, json=body)
                times[method].append(time.perf_counter() - started)
                answer.raise_for_status()
                visible.add(answer.headers["X-Model-Visible"])
        writes = 3 * args.writes
        worker_cpu = (_cpu(workers) - cpu) / writes
        client_cpu = (_own_cpu() - own) / writes
    for method, seconds in times.items():
        print(
            f"{method:6} median {median(seconds) * 1000:5.0f} ms   "
            f"worst {max(seconds) * 1000:5.0f} ms"
        )
    print(f"X-Model-Visible: {sorted(visible)}")
    print(
        f"workers' CPU per write: {worker_cpu * 1000:.1f} ms; "
        f"this client's: {client_cpu * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
