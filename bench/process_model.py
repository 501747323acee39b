"""Many processes with few threads, or few processes with many threads: one run, one app.

    python -m bench.process_model [--quick] [--seconds 6] [--shapes 1x32,2x16,4x8,2x2,1x3]
                                  [--workloads io-stream,io-upstream,cpu,native,mixed]

The same app (``bench.process_model_app``: the service, its AI API and two bench
routes) under ``quart-service serve`` in several shapes of the same host, W workers x
T pool threads (``--shapes``; by default the same 32 threads as 1x32, 2x16 and 4x8,
then 2x2 and 1x3, few threads in two or one worker). Each shape is one fresh
server (cold caches), the models created through the admin API and warmed in every
worker; then each workload runs for ``--seconds`` under wrk (one thread, fixed
connections); ``--rounds`` (2) runs every shape again in the reverse order, and
the tables show each column's median:

* ``io-stream``    streamed completions of the ``local`` engine paced at 50 tokens/s,
  25 tokens each (the client holds the stream ~0.5 s; no pool thread while paced);
* ``io-upstream``  ``GET /pm/upstream``: awaits a 50 ms upstream answer (256
  connections, the others 128; ``cpu`` 32, ``native`` 16);
* ``cpu``          completions of 256 tokens from the ``local`` n-gram engine:
  pure-Python sampling on the pool, holding the GIL;
* ``native``       completions of 8 tokens from the ``neural`` engine (a random GPT-2,
  4 layers of width 512: float32 matrix products in numpy, which release the GIL),
  batched per step by the engine (max_batch 32);
* ``mixed``        50 % cached lookups (``/pm/lookup``, keys drawn from a Zipf law,
  s = 1.1 over 20,000 keys; a miss runs one database statement), 25 % upstream
  calls, 15 % n-gram completions, 5 % paced streams, 5 % neural completions.

Columns, per shape: requests/s; p50 and p99 latency (wrk's, of the whole response);
the workers' CPU per request and their CPU use (utime + stime from /proc, summed over
the workers, in % of one core); the workers' summed PSS at the end (/proc/PID/
smaps_rollup: a page shared by the workers counts once); the peak threads of the
busiest worker (sampled from /proc every 20 ms); database statements per refresh
interval (all workers, every kind: the leader's poll, loads, the lookups' reads); the
cache hit rate and the loader calls (``/debug/identity`` of each worker); 503s (shed
by a full pool). wrk's own CPU per request is printed under each table: it shares the
two cores. Requests/s on a shared machine move by tens of percent; read the CPU per
request and the ratios within one table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from quart_service.engines.neural.random_weights import write_random_weights
from quart_service.engines.neural.weights import GPT2Config
from quart_service.native_threads import available_cpus
from quart_service.sizing import recommend
from tests.support.memory import memory
from tests.support.server import Server, peak_threads, pin_workers, running_server

from .compare import cpu_seconds
from .shared_weights import TOKEN, put_model

APP = "bench.process_model_app:app"
REFRESH_INTERVAL = 1.0
DEFAULT_SHAPES = "1x32,2x16,4x8,2x2,1x3"
KEYS = 20_000
ZIPF_S = 1.1
# The rule's hint for each workload (quart_service.sizing).
HINTS = {"io-stream": "io", "io-upstream": "io", "cpu": "cpu", "native": "native", "mixed": "mixed"}


def _completion(model: str, tokens: int, *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": "We the People of the United States",
        "max_tokens": tokens,
        "temperature": 0.7,
        "stream": stream,
    }


@dataclass(frozen=True)
class Request:
    """One kind of request of a workload and its share."""

    share: float
    path: str
    body: dict[str, Any] | None = None  # POSTed as JSON
    zipf: bool = False  # append ?key=<a key drawn from the Zipf law>


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    connections: int
    requests: tuple[Request, ...]


WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "io-stream",
            "paced token streams (25 tokens at 50/s)",
            128,
            (Request(1.0, "/v1/completions", _completion("paced", 25, stream=True)),),
        ),
        Workload(
            "io-upstream",
            "calls awaiting a 50 ms upstream",
            256,
            (Request(1.0, "/pm/upstream"),),
        ),
        Workload(
            "cpu",
            "n-gram completions, 256 tokens (pure Python on the pool)",
            32,
            (Request(1.0, "/v1/completions", _completion("ngram", 256)),),
        ),
        Workload(
            "native",
            "neural completions, 8 tokens (numpy, releases the GIL)",
            16,
            (Request(1.0, "/v1/completions", _completion("neural", 8)),),
        ),
        Workload(
            "mixed",
            "lookups (Zipf) 50 %, upstream 25 %, n-gram 15 %, streams 5 %, neural 5 %",
            128,
            (
                Request(0.50, "/pm/lookup", zipf=True),
                Request(0.25, "/pm/upstream"),
                Request(0.15, "/v1/completions", _completion("ngram", 256)),
                Request(0.05, "/v1/completions", _completion("paced", 25, stream=True)),
                Request(0.05, "/v1/completions", _completion("neural", 8)),
            ),
        ),
    )
}


# -- the load generator: wrk with a Lua script per workload ----------------------------------


def lua_script(workload: Workload, seed: int) -> str:
    """wrk's script: requests drawn by share; keys from a Zipf law (a cumulative table
    and a binary search, built once per wrk thread)."""
    lines = ["local reqs, cum = {}, {}", "local total = 0"]
    for request in workload.requests:
        if request.body is None:
            method, headers, body = '"GET"', "nil", "nil"
        else:
            method = '"POST"'
            headers = '{["Content-Type"] = "application/json"}'
            body = "[==[" + json.dumps(request.body) + "]==]"
        lines.append(f"total = total + {request.share}")
        lines.append(
            f"table.insert(reqs, {{path = {json.dumps(request.path)}, method = {method}, "
            f"headers = {headers}, body = {body}, zipf = {str(request.zipf).lower()}}})"
        )
        lines.append("table.insert(cum, total)")
    lines.append(
        f"""
local zipf = {{}}
local keys = {KEYS}
init = function(args)
  math.randomseed({seed} + (tonumber(args[1]) or 0))
  local acc = 0
  for k = 1, keys do acc = acc + 1 / k ^ {ZIPF_S}; zipf[k] = acc end
  for k = 1, keys do zipf[k] = zipf[k] / acc end
end
local function key()
  local u, lo, hi = math.random(), 1, keys
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if zipf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end
request = function()
  local u, pick = math.random() * total, #reqs
  for i = 1, #reqs do if u <= cum[i] then pick = i; break end end
  local r = reqs[pick]
  local path = r.path
  if r.zipf then path = path .. "?key=" .. key() end
  return wrk.format(r.method, path, r.headers, r.body)
end
"""
    )
    return "\n".join(lines)


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    cpu_s: float  # wrk's own CPU


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, script: Path, seconds: float, connections: int) -> WrkResult:
    """One wrk run (one thread: the client's CPU stays small); its latency percentiles."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [
            "wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--latency",
            "--timeout", "30s", "-s", str(script), url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if done is None or p50 is None or p99 is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1000,
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every CPU), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# -- the server and its workers -------------------------------------------------------------


@dataclass
class Counters:
    """What the workers' /debug/identity count, summed over them."""

    statements: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.statements - other.statements,
            self.hits - other.hits,
            self.misses - other.misses,
            self.loads - other.loads,
        )


@dataclass
class Shape:
    workers: int
    threads: int
    native: int | None = None  # the native_threads setting (None: the default budget)

    @property
    def label(self) -> str:
        native = f"/{self.native}" if self.native is not None else ""
        return f"{self.workers}x{self.threads}{native}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``WxT`` or ``WxT/N`` (N: native_threads)."""
        size, _, native = text.partition("/")
        workers, threads = (int(n) for n in size.split("x"))
        return cls(workers, threads, int(native) if native else None)


@dataclass
class Row:
    shape: str
    per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # workers' CPU per request
    cpu_pct: float  # workers' CPU, % of one core
    pss_mb: float
    threads: int  # the busiest worker's peak
    statements_per_interval: float
    hit_rate: float | None
    loads: int
    shed: int
    wrk_us: float
    others_pct: float  # CPU of every other process on the machine, % of one core


@dataclass
class Running:
    server: Server
    clients: dict[int, httpx.Client] = field(default_factory=dict)

    def counters(self) -> Counters:
        total = Counters()
        for client in self.clients.values():
            data = client.get("/debug/identity").json()["data"]
            total.statements += sum(data["queries"].values())
            total.hits += data["cache"]["hits"]
            total.misses += data["cache"]["misses"]
            total.loads += data["cache"]["loads"]
        return total


def _models(weights: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "paced": ("local", {"tokens_per_second": 50}),
        "ngram": ("local", {"order": 3}),
        "neural": ("neural", {"weights": str(weights)}),
    }


def _served_models(client: httpx.Client) -> list[str]:
    models: list[str] = client.get("/debug/identity").json()["data"]["models"]
    return models


def _put(server: Server, name: str, engine: str, parameters: dict[str, Any]) -> None:
    if engine == "neural":
        put_model(server, name, parameters)
        return
    response = httpx.post(
        server.url + "/admin/models",
        json={"name": name, "engine": engine, "parameters": parameters},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    response.raise_for_status()


@contextlib.contextmanager
def serving(shape: Shape, folder: Path, weights: Path) -> Iterator[Running]:
    env = {
        "QUART_SERVICE_EXECUTOR_THREADS": str(shape.threads),
        "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
        "QUART_SERVICE_ADMIN_TOKEN": TOKEN,
        "QUART_SERVICE_REFRESH_INTERVAL": str(REFRESH_INTERVAL),
        "QUART_SERVICE_ACCESS_LOG": "0",
        "QUART_SERVICE_EXECUTOR_QUEUE": "256",
    }
    if shape.native is not None:
        env["QUART_SERVICE_NATIVE_THREADS"] = str(shape.native)
    with running_server(
        folder, app=APP, workers=shape.workers, env=env, command="serve", start_timeout=60
    ) as server:
        running = Running(server, pin_workers(server, shape.workers))
        try:
            for name, (engine, parameters) in _models(weights).items():
                _put(server, name, engine, parameters)
            deadline = time.monotonic() + 20
            for client in running.clients.values():
                while set(_models(weights)) - set(_served_models(client)):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the models did not reach every worker")
                    time.sleep(0.1)
                for name in _models(weights):  # each engine built (numpy loaded) here
                    body = {**_completion(name, 2), "stream": False}
                    client.post("/v1/completions", json=body, timeout=120).raise_for_status()
            yield running
        finally:
            for client in running.clients.values():
                client.close()


def measure(running: Running, workload: Workload, seconds: float, script: Path) -> Row:
    server = running.server
    pids = server.worker_pids()
    before_counters = running.counters()
    cpu_before = {pid: cpu_seconds(pid) for pid in pids}
    busy_before = machine_busy()
    with peak_threads(pids, every=0.02) as peak:
        result = run_wrk(server.url, script, seconds, workload.connections)
    cpu = sum(cpu_seconds(pid) - cpu_before[pid] for pid in pids)
    others = machine_busy() - busy_before - cpu - result.cpu_s
    counters = running.counters() - before_counters
    pss = sum(memory(pid).pss for pid in pids)
    looked_up = counters.hits + counters.misses
    completed = max(result.requests, 1)
    return Row(
        shape="",
        per_s=result.requests / result.seconds,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        cpu_us=cpu / completed * 1e6,
        cpu_pct=cpu / result.seconds * 100,
        pss_mb=pss / 2**20,
        threads=max(peak.values()),
        statements_per_interval=counters.statements / (result.seconds / REFRESH_INTERVAL),
        hit_rate=counters.hits / looked_up if looked_up else None,
        loads=counters.loads,
        shed=result.non_2xx + result.socket_errors,
        wrk_us=result.cpu_s / completed * 1e6,
        others_pct=max(others, 0.0) / result.seconds * 100,
    )


def median_row(rows: list[Row]) -> Row:
    """Each column's median over the rounds (the shape's rows)."""

    def med(values: list[float]) -> float:
        return statistics.median(values)

    hits = [r.hit_rate for r in rows if r.hit_rate is not None]
    return Row(
        shape=rows[0].shape,
        per_s=med([r.per_s for r in rows]),
        p50_ms=med([r.p50_ms for r in rows]),
        p99_ms=med([r.p99_ms for r in rows]),
        cpu_us=med([r.cpu_us for r in rows]),
        cpu_pct=med([r.cpu_pct for r in rows]),
        pss_mb=med([r.pss_mb for r in rows]),
        threads=max(r.threads for r in rows),
        statements_per_interval=med([r.statements_per_interval for r in rows]),
        hit_rate=med(hits) if hits else None,
        loads=round(med([r.loads for r in rows])),
        shed=sum(r.shed for r in rows),
        wrk_us=med([r.wrk_us for r in rows]),
        others_pct=med([r.others_pct for r in rows]),
    )


def print_table(workload: Workload, rows: list[Row], rule: str, rounds: int) -> None:
    print(f"\n{workload.name}: {workload.what}; wrk -c{workload.connections}")
    print(
        f"{'W x T':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU/req':>9} {'CPU %':>6} "
        f"{'PSS MB':>7} {'thr/wkr':>7} {'stmts/int':>9} {'hit %':>6} {'loads':>6} {'503s':>5} "
        f"{'others %':>8}"
    )
    for row in rows:
        hit = f"{row.hit_rate * 100:6.1f}" if row.hit_rate is not None else f"{'-':>6}"
        mark = "*" if row.shape == rule else " "
        print(
            f"{mark}{row.shape:>7} {row.per_s:8.0f} {row.p50_ms:8.1f} {row.p99_ms:8.1f} "
            f"{_us(row.cpu_us):>9} {row.cpu_pct:6.0f} {row.pss_mb:7.0f} {row.threads:7d} "
            f"{row.statements_per_interval:9.1f} {hit} {row.loads:6d} {row.shed:5d} "
            f"{row.others_pct:8.0f}"
        )
    wrk_us = ", ".join(f"{r.shape} {_us(r.wrk_us)}" for r in rows)
    print(
        f"  (medians of {rounds} rounds; * the rule's shape for '{HINTS[workload.name]}'; "
        f"wrk's CPU per request: {wrk_us})"
    )


def _us(value: float) -> str:
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument(
        "--shapes",
        default=DEFAULT_SHAPES,
        help="WxT,... (workers x pool threads; WxT/N: native_threads N)",
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=2, help="shapes interleaved")
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 2 s per workload, shapes 1x32,2x16,4x8"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench needs wrk: apt-get install wrk")
    seconds = 2.0 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    shape_text = "1x32,2x16,4x8" if args.quick and args.shapes == DEFAULT_SHAPES else args.shapes
    shapes = [Shape.parse(text) for text in shape_text.split(",")]
    workloads = [WORKLOADS[name] for name in args.workloads.split(",")]
    cpus = available_cpus()
    load_before = os.getloadavg()
    print(
        f"{cpus} CPUs (affinity and cgroup quota); load average before {load_before[0]:.2f}; "
        f"{seconds:g} s per workload; refresh interval {REFRESH_INTERVAL:g} s"
    )
    rows: dict[tuple[str, str], list[Row]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = folder / "neural.safetensors"
        config = GPT2Config(n_layer=4, n_head=8, n_embd=512, vocab_size=256, n_ctx=256)
        write_random_weights(weights, config, seed=1)
        scripts = {}
        for n, workload in enumerate(workloads):
            scripts[workload.name] = folder / f"{workload.name}.lua"
            scripts[workload.name].write_text(lua_script(workload, seed=1000 * n))
        for round_no in range(rounds):
            # Every other round backwards: no shape always runs first (or last).
            order = shapes if round_no % 2 == 0 else shapes[::-1]
            for shape in order:
                shape_started = time.monotonic()
                here = folder / f"{shape.label.replace('/', 'n')}-{round_no}"
                here.mkdir()
                with serving(shape, here, weights) as running:
                    for workload in workloads:
                        row = measure(running, workload, seconds, scripts[workload.name])
                        row.shape = shape.label
                        rows.setdefault((workload.name, shape.label), []).append(row)
                        print(
                            f"  round {round_no + 1} {shape.label:>5} {workload.name:11} "
                            f"{row.per_s:7.0f}/s CPU {_us(row.cpu_us):>9}/req "
                            f"p99 {row.p99_ms:7.1f} ms, others {row.others_pct:4.0f} %",
                            flush=True,
                        )
                took = time.monotonic() - shape_started
                print(f"  round {round_no + 1} {shape.label}: {took:.0f} s", flush=True)
    for workload in workloads:
        rule = recommend(cpus, HINTS[workload.name])
        table = [median_row(rows[(workload.name, shape.label)]) for shape in shapes]
        print_table(workload, table, f"{rule.workers}x{rule.threads}", rounds)
    print(
        f"\nwhole run {time.monotonic() - started:.0f} s; load average before "
        f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (other jobs share the CPUs)"
    )


if __name__ == "__main__":
    main()
