"""Instructions per request and per paced event, service against bare Quart, on Hypercorn
or Granian.

    python -m bench.instructions [--routes hello,paced,awaited] [--requests 20,60]
                                 [--server hypercorn|granian]

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
little above the instruction ratio), and the access log's write, which goes to a log
file here as in service. Needs valgrind (Debian's package); a run takes about a
minute per app and route.
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


def _serve(server: str, app: str, folder: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    out = folder / f"callgrind-{port}.out"
    argv = [
        "valgrind",
        "--tool=callgrind",
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


def _count(
    server: str, app: str, path: str, count: int, folder: Path, idle: float = 0.0
) -> tuple[int, float]:
    """Instructions the server ran while one client sent ``count`` requests to ``path``
    (or, with ``idle``, while no request came for that many seconds), and the seconds
    that took."""
    process, port, out = _serve(server, app, folder)
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
    match = re.search(r"^summary: (\d+)", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no summary in {dumps[-1]}")
    return int(match.group(1)), elapsed


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
        "--requests", default="20,60", help="the two request counts whose slope is measured"
    )
    parser.add_argument(
        "--idle", type=float, default=10.0, help="seconds the idle background is measured"
    )
    args = parser.parse_args()
    low, high = (int(n) for n in args.requests.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        idle = {}
        for name, app in APPS.items():
            folder = Path(tmp) / f"{name}-idle"
            folder.mkdir()
            total, seconds = _count(args.server, app, "/hello", 0, folder, idle=args.idle)
            idle[name] = total / seconds
            print(f"{name}: {idle[name]:,.0f} instructions/s with no request", flush=True)
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
                    total, seconds = _count(args.server, app, path, requests, folder)
                    counted.append(total - idle[name] * seconds)
                slope[name] = (counted[1] - counted[0]) / (high - low) / per_unit
            s, b = slope["service"], slope["bare"]
            print(f"| {path} (per {unit}) | {s:,.0f} | {b:,.0f} | {s / b:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
