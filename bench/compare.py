"""Throughput and CPU cost of quart_service against a bare Quart app, in one run.

    python -m bench.compare [--seconds 5] [--rounds 2] [--connections 64] [--before DIR]

Stacks (2 worker processes each, on loopback, wrk as the client):

* ``service``        quart_service under the shipped hypercorn.toml (uvloop workers)
* ``bare-tuned``     a bare Quart app under the same hypercorn.toml
* ``bare-default``   the bare Quart app under Hypercorn's default settings (asyncio)

Routes: JSON hello; SSE of 100 small events from an async generator, all ready at
once (``sse``, a burst: coalescing wins) and paced with an ``await asyncio.sleep(0)``
between events (``paced``: one event per loop turn, as a model yields tokens); the same
100 events from a sync generator (the service's pool bridge vs Quart's
run_sync_iterable).
``--before DIR`` adds ``service-before``: the same service app from another checkout
(``git worktree add DIR <commit>``), so a change is compared with the code before it
in the same run. Rounds are interleaved because requests/s move by up to 2x between runs on a shared
machine; worker CPU time per request (utime+stime from /proc) is the steadier number.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from tests.support.server import ROOT, SHIPPED_CONFIG, Server, running_server

# cpu_seconds: other benches import it from here.
from ._wrk import cpu_seconds as cpu_seconds
from ._wrk import measure_wrk

EVENTS_PER_STREAM = 100
ROUTES = {
    "json": "/hello",
    "sse": "/sse",
    "paced": "/paced",
    "awaited": "/awaited",
    "sync": "/sync",
}


@dataclass(frozen=True)
class Stack:
    name: str
    app: str
    config: Path | None
    env: dict[str, str] = field(default_factory=dict)
    root: Path | None = None  # another checkout to run (None: this one)


STACKS = [
    Stack("service", "bench.apps:service", SHIPPED_CONFIG),
    # The same without the access log line per request (QUART_SERVICE_ACCESS_LOG=0).
    Stack("service-nolog", "bench.apps:service", SHIPPED_CONFIG, {"QUART_SERVICE_ACCESS_LOG": "0"}),
    # Neither the access log nor the Prometheus metrics: what observability costs.
    Stack(
        "service-noobs",
        "bench.apps:service",
        SHIPPED_CONFIG,
        {"QUART_SERVICE_ACCESS_LOG": "0", "QUART_SERVICE_METRICS": "0"},
    ),
    Stack("bare-tuned", "bench.apps:bare", SHIPPED_CONFIG),
    Stack("bare-default", "bench.apps:bare", None),
]


@dataclass
class Sample:
    requests_per_s: float
    cpu_us_per_request: float
    peak_threads: int
    busiest_share: float  # the busiest worker's share of the workers' CPU time


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def add(self, stack: str, route: str, sample: Sample) -> None:
        self.samples.setdefault((stack, route), []).append(sample)

    def rps(self, stack: str, route: str) -> float:
        return median(s.requests_per_s for s in self.samples[(stack, route)])

    def cpu(self, stack: str, route: str) -> float:
        return median(s.cpu_us_per_request for s in self.samples[(stack, route)])

    def threads(self, stack: str, route: str) -> int:
        return max(s.peak_threads for s in self.samples[(stack, route)])


def measure(server: Server, route: str, seconds: float, connections: int) -> Sample:
    load = measure_wrk(server, route, seconds, connections)
    completed = load.run.completed
    return Sample(
        completed / load.elapsed,
        sum(load.worker_cpu) / completed * 1e6,
        load.peak_threads,
        load.busiest,
    )


def run(
    seconds: float, rounds: int, connections: int, stacks: list[Stack], routes: dict[str, str]
) -> Results:
    results = Results()
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(1, rounds + 1):
            # Rotate the order each round, so no stack always runs first (or last).
            shift = (round_no - 1) % len(stacks)
            for stack in stacks[shift:] + stacks[:shift]:
                with running_server(
                    Path(tmp),
                    app=stack.app,
                    workers=2,
                    config=stack.config,
                    env=stack.env,
                    root=stack.root or ROOT,
                ) as server:
                    for kind, route in routes.items():
                        sample = measure(server, route, seconds, connections)
                        results.add(stack.name, kind, sample)
                        print(
                            f"round {round_no} {stack.name:13} {kind:7} "
                            f"{sample.requests_per_s:9.0f} req/s "
                            f"{sample.cpu_us_per_request:8.1f} us CPU/req "
                            f"{sample.peak_threads:3d} threads "
                            f"busiest worker {sample.busiest_share:4.0%} of CPU",
                            flush=True,
                        )
    return results


def report(results: Results, stacks: list[Stack], routes: dict[str, str]) -> None:
    print("\nmedians over rounds (2 workers each; streams: 100 events per request)")
    print("worker CPU: us per JSON request, us per event for the streams")
    streams = [kind for kind in routes if kind != "json"]
    kinds = [kind for kind in routes if kind in ("json", *streams)]
    print(f"{'stack':14}" + "".join(f"{kind + ' /s':>13}{'us':>8}" for kind in kinds))
    for stack in stacks:
        name, cells = stack.name, []
        for kind in kinds:
            per = 1 if kind == "json" else EVENTS_PER_STREAM
            rate, cpu = results.rps(name, kind) * per, results.cpu(name, kind) / per
            cells.append(f"{rate:13.0f}{cpu:8.2f}")
        print(f"{name:14}" + "".join(cells))
    names = {stack.name for stack in stacks}
    print("\nworker CPU per request or event, service / bare-tuned (target)")
    targets = {"json": 1.05, "sse": 1.0, "paced": 1.1, "awaited": 1.1, "sync": 1.0}
    for ours in ("service", "service-nolog", "service-noobs", "service-before"):
        if ours not in names or "bare-tuned" not in names:
            continue
        for kind in kinds:
            ratio = results.cpu(ours, kind) / results.cpu("bare-tuned", kind)
            target = targets.get(kind, 1.0)
            verdict = "ok" if ratio <= target else "ABOVE"
            print(f"  {ours:14} {kind:8} {ratio:5.2f}x (<= {target}x: {verdict})")
    if "service-before" in names:
        for kind in kinds:
            ratio = results.cpu("service", kind) / results.cpu("service-before", kind)
            print(f"  service / service-before {kind:8} {ratio:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--before", type=Path, help="another checkout to compare with")
    parser.add_argument("--stacks", help="comma-separated stack names (default: all)")
    parser.add_argument("--routes", help=f"comma-separated, of {','.join(ROUTES)}")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench needs wrk: apt-get install wrk")
    stacks = list(STACKS)
    if args.before is not None:
        stacks.insert(
            1, Stack("service-before", "bench.apps:service", SHIPPED_CONFIG, root=args.before)
        )
    if args.stacks:
        wanted = args.stacks.split(",")
        stacks = [stack for stack in stacks if stack.name in wanted]
    routes = dict(ROUTES)
    if args.routes:
        routes = {kind: ROUTES[kind] for kind in args.routes.split(",")}
    report(run(args.seconds, args.rounds, args.connections, stacks, routes), stacks, routes)


if __name__ == "__main__":
    main()
