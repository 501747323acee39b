"""CPU cost of the same service under Hypercorn, Granian and Uvicorn, in one run.

    python -m bench.servers [--seconds 5] [--rounds 2] [--connections 64]
                            [--paced /paced|/paced-bytes|/paced-json]

Stacks (2 worker processes each, on loopback, wrk as the client), an app under a server:

* ``service@hypercorn``  quart_service (``bench.apps:service``), shipped hypercorn.toml
* ``service@granian``    ``granian --interface asgi --loop uvloop`` (docs/servers.md)
* ``service@uvicorn``    ``uvicorn --loop uvloop --http httptools --no-access-log``
* ``bare@hypercorn``, ``bare@granian``  bare Quart (``bench.apps:bare``), the same peers
* ``fastapi@uvicorn``    FastAPI + sse-starlette (``bench.apps_fastapi:app``), if the
  ``bench`` extra is installed

Routes: JSON hello, and the paced SSE stream (100 events, an ``await`` between them,
as a model yields tokens). ``--paced`` picks the stream (``bench.apps``): ``/paced``
(the service JSON-encodes each token, bare Quart sends one constant), ``/paced-bytes``
(the same ready-made bytes both sides: the stream path alone) or ``/paced-json`` (both
encode each token); FastAPI always serves its ``/paced`` (it encodes). The steady
number is the workers' CPU time (utime+stime from /proc) per request or per event;
requests/s move with whatever else the machine runs. wrk's own CPU per request is
printed too: it shares the two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from statistics import median

from tests.support.other_servers import Kind, running_other_server
from tests.support.server import Server, running_server

from ._wrk import measure_wrk
from .compare import EVENTS_PER_STREAM

STACKS = (
    "service@hypercorn",
    "bare@hypercorn",
    "service@granian",
    "bare@granian",
    "service@uvicorn",
    "fastapi@uvicorn",
)
ROUTES = {"json": "/hello", "paced": "/paced"}
PACED = ("/paced", "/paced-bytes", "/paced-json")
APPS = {
    "service": "bench.apps:service",
    "bare": "bench.apps:bare",
    "fastapi": "bench.apps_fastapi:app",
}


@contextlib.contextmanager
def serving(stack: str, tmp: Path) -> Iterator[Server]:
    name, server = stack.split("@")
    app = APPS[name]
    env = {"QUART_SERVICE_DATA_DIR": str(tmp / name)}
    if server == "hypercorn":
        with running_server(tmp, app=app, workers=2, env=env) as hypercorn:
            yield hypercorn
    else:
        kind: Kind = "granian" if server == "granian" else "uvicorn"
        extra = ["--no-access-log"] if kind == "uvicorn" else []
        with running_other_server(kind, tmp, app=app, env=env, extra=extra) as other:
            yield other


def measure(
    server: Server, route: str, seconds: float, connections: int, per: int
) -> dict[str, float]:
    """Worker and wrk CPU per event (``per`` events a response) and events/s."""
    load = measure_wrk(server, route, seconds, connections)
    events = load.run.completed * per
    return {
        "per_s": events / load.elapsed,
        "us": sum(load.worker_cpu) / events * 1e6,
        "wrk_us": load.run.cpu / events * 1e6,
        "threads": load.peak_threads,
        "busiest": load.busiest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--stacks", help=f"comma-separated, of {','.join(STACKS)}")
    parser.add_argument("--paced", default="/paced", choices=PACED)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench needs wrk: apt-get install wrk")
    stacks = tuple(args.stacks.split(",")) if args.stacks else STACKS
    try:
        import fastapi  # noqa: F401
    except ImportError:
        print("fastapi@uvicorn skipped: pip install -e '.[bench]'")
        stacks = tuple(s for s in stacks if not s.startswith("fastapi"))
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(args.rounds):
            shift = round_no % len(stacks)  # no stack always first
            for stack in stacks[shift:] + stacks[:shift]:
                with serving(stack, Path(tmp)) as server:
                    for name, route in ROUTES.items():
                        per = 1
                        if name == "paced":
                            per = EVENTS_PER_STREAM
                            route = route if stack.startswith("fastapi") else args.paced
                        s = measure(server, route, args.seconds, args.connections, per)
                        samples.setdefault((stack, name), []).append(s)
                        print(
                            f"round {round_no + 1} {stack:17} {name:5} {s['per_s']:9.0f}/s "
                            f"{s['us']:7.1f} us worker CPU {s['wrk_us']:6.1f} us wrk CPU "
                            f"{s['threads']:3.0f} threads, busiest worker {s['busiest']:4.0%}",
                            flush=True,
                        )
    print(
        f"\nmedians over {args.rounds} rounds, paced route {args.paced}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'stack':17} {'us/JSON':>8} {'us/paced ev':>12} {'JSON/s':>8} {'paced ev/s':>11}")

    def med(stack: str, name: str, key: str) -> float:
        return median(s[key] for s in samples[(stack, name)])

    for stack in stacks:
        print(
            f"{stack:17} {med(stack, 'json', 'us'):8.1f} {med(stack, 'paced', 'us'):12.2f} "
            f"{med(stack, 'json', 'per_s'):8.0f} {med(stack, 'paced', 'per_s'):11.0f}"
        )
    print("\nworker CPU ratios (target)")
    for host in ("hypercorn", "granian"):
        ours, bare = f"service@{host}", f"bare@{host}"
        if ours in stacks and bare in stacks:
            for name, target in (("paced", 1.1), ("json", 1.05)):
                ratio = med(ours, name, "us") / med(bare, name, "us")
                print(f"  {ours} / {bare}, {name:5} {ratio:5.2f}x (<= {target})")
    if "fastapi@uvicorn" in stacks:
        for ours in (s for s in stacks if s.startswith("service@")):
            ratio = med(ours, "paced", "us") / med("fastapi@uvicorn", "paced", "us")
            rate = med(ours, "paced", "per_s") / med("fastapi@uvicorn", "paced", "per_s")
            print(
                f"  {ours} / fastapi@uvicorn, paced: CPU {ratio:5.2f}x (<= 0.8 under the "
                f"fastest server), events/s {rate:5.2f}x (>= 1)"
            )


if __name__ == "__main__":
    main()
