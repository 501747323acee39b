"""Instructions per request and per paced event, service against bare Quart, on Hypercorn
or Granian.

    python -m bench.instructions [--routes hello,paced,awaited] [--requests 20,60]
                                 [--server hypercorn|granian] [--cycles]

CPU time on this shared 2-core machine moves by 10-30 % between runs of the same
code; an instruction count does not. Each app (``bench.apps:service`` and
``bench.apps:bare``) is served by one Hypercorn process with no worker processes
(``-w 0``: the server runs in the process valgrind watches), the shipped
``hypercorn.toml`` (uvloop), under ``valgrind --tool=callgrind`` with collection off.
With ``--server granian`` it is Granian's embedded server instead (one process, one
runtime thread, uvloop: ``bench/granian_embedded.py``), whose Rust threads valgrind
counts too.
After 20 untimed requests, collection is switched on, one keep-alive client sends N
requests one after another, and the count is dumped; the cost of one request is the
slope between two values of N (the constant part, switching collection on and off,
drops out). Per event: a request's count over its 100 events.

The service also works when no request comes: its clock moves metric tallies every
0.25 s and samples every second, its refresh leader polls the database. In service
that is about one request's worth of instructions a second, nothing per request; but
under valgrind a request takes some 50 times as long, so that background would be
charged to the requests. It is measured first (collection on for ``--idle`` seconds
with no request) and its rate times each run's duration is taken off.

What this leaves out, on purpose: the time an instruction takes (cache and branch
misses grow with the code a request runs through, so a CPU-time ratio is usually a
little above the instruction ratio). ``--cycles`` puts that back, still without noise:
valgrind simulates the caches and the branch predictor, and the count becomes
callgrind's cycle estimate (an instruction one cycle, a first-level miss ten more, a
last-level miss a hundred, a mispredicted branch ten). The access log is written, to a
log file, as in service. Needs valgrind (Debian's package); a run takes about a minute
per app and route (two with ``--cycles``).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from tests.support.server import SHIPPED_CONFIG, free_port

from ._servers import launch

APPS = {"service": "bench.apps:service", "bare": "bench.apps:bare"}
EVENTS = 100  # bench.apps' streams
WARM = 20


def _server_argv(server: str, app: str, port: int) -> list[str]:
    if server == "granian":
        return ["-m", "bench.granian_embedded", app, str(port)]
    config = ["--config", str(SHIPPED_CONFIG), "-w", "0", "-b", f"127.0.0.1:{port}"]
    return ["-m", "hypercorn", *config, app]


def _serve(
    server: str, app: str, folder: Path, cycles: bool
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    out = folder / f"callgrind-{port}.out"
    simulate = ["--cache-sim=yes", "--branch-sim=yes"] if cycles else []
    argv = [
        "valgrind",
        "--tool=callgrind",
        *simulate,
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        os.path.realpath(sys.executable),
        *_server_argv(server, app, port),
    ]
    env = {"QUART_SERVICE_DATA_DIR": str(folder / f"data-{port}")}
    process = launch(argv, env, folder / f"server-{port}.log")
    return process, port, out


def _requests(port: int, path: str, count: int, timeout: float = 120) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        for _ in range(count):
            connection.request("GET", path)
            answer = connection.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"GET {path}: {answer.status}")
    finally:
        connection.close()


def _callgrind(command: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", *command.split(), str(pid)], check=True, capture_output=True
    )


class Under(NamedTuple):
    """What a count runs under: the server, and whether it estimates cycles (caches
    and branch predictors simulated) rather than counting instructions."""

    server: str
    cycles: bool


def _count(
    under: Under, app: str, path: str, count: int, folder: Path, idle: float = 0.0
) -> tuple[int, float]:
    """Instructions (or estimated cycles) the server ran while one client sent
    ``count`` requests to ``path`` (or, with ``idle``, while no request came for that
    many seconds), and the seconds that took."""
    server, cycles = under
    process, port, out = _serve(server, app, folder, cycles)
    try:
        deadline = time.monotonic() + 300  # imports under valgrind take a while
        while True:
            try:
                _requests(port, path, 1)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{app} did not start under valgrind") from None
                time.sleep(0.5)
        _requests(port, path, WARM)
        _callgrind("-i on", process.pid)
        started = time.monotonic()
        _requests(port, path, count)
        time.sleep(idle)
        elapsed = time.monotonic() - started
        _callgrind("-d", process.pid)
        _callgrind("-i off", process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    dumps = sorted(folder.glob(out.name + ".*"))
    text = dumps[-1].read_text()
    events = re.search(r"^events: (.+)$", text, re.MULTILINE)
    summary = re.search(r"^summary: (.+)$", text, re.MULTILINE)
    if events is None or summary is None:
        raise RuntimeError(f"no summary in {dumps[-1]}")
    names, values = events.group(1).split(), summary.group(1).split()
    counts = {name: int(value) for name, value in zip(names, values, strict=True)}
    return (_estimated_cycles(counts) if cycles else counts["Ir"]), elapsed


def _estimated_cycles(counts: dict[str, int]) -> int:
    """Callgrind's own cycle estimate (KCachegrind's "CEst"): an instruction is one
    cycle, a first-level miss (instruction or data) ten more, a last-level miss a
    hundred, a mispredicted branch ten."""
    first = counts["I1mr"] + counts["D1mr"] + counts["D1mw"]
    last = counts["ILmr"] + counts["DLmr"] + counts["DLmw"]
    return counts["Ir"] + 10 * first + 100 * last + 10 * (counts["Bcm"] + counts["Bim"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", default="hello,paced,awaited")
    parser.add_argument(
        "--server",
        choices=("hypercorn", "granian"),
        default="hypercorn",
        help="granian: its embedded server, in one process (bench.granian_embedded)",
    )
    parser.add_argument(
        "--cycles",
        action="store_true",
        help="estimate cycles: simulate the caches and branch predictor (about 2x slower)",
    )
    parser.add_argument(
        "--requests", default="20,60", help="the two request counts whose slope is measured"
    )
    parser.add_argument(
        "--idle", type=float, default=10.0, help="seconds the idle background is measured"
    )
    args = parser.parse_args()
    low, high = (int(n) for n in args.requests.split(","))
    under = Under(args.server, args.cycles)
    measure = "estimated cycles" if args.cycles else "instructions"
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        idle = {}
        for name, app in APPS.items():
            folder = Path(tmp) / f"{name}-idle"
            folder.mkdir()
            total, seconds = _count(under, app, "/hello", 0, folder, idle=args.idle)
            idle[name] = total / seconds
            print(f"{name}: {idle[name]:,.0f} {measure}/s with no request", flush=True)
        print("\n| route | service | bare | service ÷ bare |\n|---|---|---|---|")
        for route in args.routes.split(","):
            path = "/" + route
            per_unit = EVENTS if route != "hello" else 1
            unit = "request" if per_unit == 1 else "event"
            slope = {}
            for name, app in APPS.items():
                folder = Path(tmp) / f"{name}-{route}"
                folder.mkdir()
                counted = []
                for requests in (low, high):
                    total, seconds = _count(under, app, path, requests, folder)
                    counted.append(total - idle[name] * seconds)
                slope[name] = (counted[1] - counted[0]) / (high - low) / per_unit
            s, b = slope["service"], slope["bare"]
            print(f"| {path} (per {unit}) | {s:,.0f} | {b:,.0f} | {s / b:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
