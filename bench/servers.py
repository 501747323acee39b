"""CPU cost of the same service under Hypercorn, Granian and Uvicorn, in one run.

    python -m bench.servers [--seconds 5] [--rounds 2] [--connections 64]

Stacks (``bench.apps:service``, 2 worker processes each, on loopback, wrk as the client):

* ``hypercorn``  the shipped hypercorn.toml (uvloop workers)
* ``granian``    ``granian --interface asgi --loop uvloop`` (docs/servers.md)
* ``uvicorn``    ``uvicorn --loop uvloop --http httptools --no-access-log``

Routes: JSON hello, and the paced SSE stream (100 events, an ``await`` between them,
as a model yields tokens). The steady number is the workers' CPU time (utime+stime
from /proc) per request or per event; requests/s move with whatever else the machine
runs. wrk's own CPU per request is printed too: it shares the two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median

from tests.support.other_servers import Kind, running_other_server
from tests.support.server import Server, peak_threads, running_server

from .compare import EVENTS_PER_STREAM, cpu_seconds

STACKS = ("hypercorn", "granian", "uvicorn")
ROUTES = {"json": "/hello", "paced": "/paced"}
APP = "bench.apps:service"


def wrk(url: str, seconds: float, connections: int) -> tuple[int, float]:
    """Completed requests of one wrk run and the CPU seconds wrk itself used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{round(seconds)}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    if errors := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"{url}: {errors.group(1)} failed responses")
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return int(match.group(1)), used


@contextlib.contextmanager
def serving(stack: str, tmp: Path) -> Iterator[Server]:
    env = {"QUART_SERVICE_DATA_DIR": str(tmp / stack)}
    if stack == "hypercorn":
        with running_server(tmp, app=APP, workers=2, env=env) as server:
            yield server
    else:
        kind: Kind = "granian" if stack == "granian" else "uvicorn"
        extra = ["--no-access-log"] if kind == "uvicorn" else []
        with running_other_server(kind, tmp, app=APP, env=env, extra=extra) as other:
            yield other


def measure(server: Server, route: str, seconds: float, connections: int) -> dict[str, float]:
    pids = server.worker_pids()
    wrk(server.url + route, 1, connections)  # warm up: imports, first-use paths
    with peak_threads(pids, every=0.05) as peak:
        cpu_before, started = [cpu_seconds(p) for p in pids], time.monotonic()
        completed, wrk_cpu = wrk(server.url + route, seconds, connections)
        elapsed = time.monotonic() - started
        cpu = [cpu_seconds(p) - b for p, b in zip(pids, cpu_before, strict=True)]
    per = EVENTS_PER_STREAM if route == ROUTES["paced"] else 1
    return {
        "per_s": completed * per / elapsed,
        "us": sum(cpu) / (completed * per) * 1e6,
        "wrk_us": wrk_cpu / (completed * per) * 1e6,
        "threads": max(peak.values()),
        "busiest": max(cpu) / sum(cpu) if sum(cpu) else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench needs wrk: apt-get install wrk")
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(args.rounds):
            shift = round_no % len(STACKS)  # no stack always first
            for stack in STACKS[shift:] + STACKS[:shift]:
                with serving(stack, Path(tmp)) as server:
                    for name, route in ROUTES.items():
                        s = measure(server, route, args.seconds, args.connections)
                        samples.setdefault((stack, name), []).append(s)
                        print(
                            f"round {round_no + 1} {stack:9} {name:5} {s['per_s']:9.0f}/s "
                            f"{s['us']:7.1f} us worker CPU {s['wrk_us']:6.1f} us wrk CPU "
                            f"{s['threads']:3.0f} threads, busiest worker {s['busiest']:4.0%}",
                            flush=True,
                        )
    print(f"\nmedians over {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    print(f"{'stack':9} {'us/JSON':>8} {'us/paced ev':>12} {'JSON/s':>8} {'paced ev/s':>11}")
    for stack in STACKS:

        def med(name: str, key: str, stack: str = stack) -> float:
            return median(s[key] for s in samples[(stack, name)])

        print(
            f"{stack:9} {med('json', 'us'):8.1f} {med('paced', 'us'):12.2f} "
            f"{med('json', 'per_s'):8.0f} {med('paced', 'per_s'):11.0f}"
        )


if __name__ == "__main__":
    main()
