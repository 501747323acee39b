"""Large datasets: swap latency, CPU per swap and memory of the published SQLite files.

    python -m bench.datasets [--sizes 1000,100000,1000000] [--changes 20,20,5]

For each size, a table ``big_rows`` of that many rows (~100 bytes each) and a real
Hypercorn with 4 workers serving ``bench.datasets_app`` (refresh_interval 1 s), one
pinned keep-alive client per worker. A poller thread asks every worker for the
version it serves (``GET /ds/version``, reads no row) round after round, the whole
time, so the load it puts on the workers is the same in every phase:

1. changes: ``UPDATE big_rows SET weight = weight + 1 WHERE id = <random>`` with the
   stdlib sqlite3, at a random moment after the previous change was everywhere;
   commit -> the first poll answer with a newer version, for each worker.
2. CPU per swap: utime+stime of each worker (``/proc/PID/stat``) over the change
   loop, minus the same over an idle period as long (same polling, no change),
   divided by the swaps; the leader (it makes the copy) apart from the followers.
3. memory: ``/proc/PID/smaps_rollup`` of every worker after each one read every row
   (``GET /ds/scan``; unread pages of a mapped file are never in Pss).
4. the old format: ``json.loads`` of the same rows as one JSON array, plus a dict
   by id, in a fresh subprocess: CPU time and RSS growth, what every follower would
   pay per swap without the SQLite files.

The bench process's own CPU (the load generator) is printed per phase.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median, quantiles

import httpx

from quart_service.data.migrations import apply_migrations
from quart_service.data.published import DatasetView, copy_query
from tests.support.server import ROOT, Server, pin_workers, running_server, wait_for

from .datasets_app import BIG

INTERVAL = 1.0
WORKERS = 4
TICK = os.sysconf("SC_CLK_TCK")
MB = 1 << 20
# Seconds between two polling rounds (a round asks each worker once).
POLL_PERIOD = 0.01
# At most this long without polling, for the workers' own CPU per second.
QUIET_MAX = 15.0


def _env(data_dir: Path) -> dict[str, str]:
    return {
        "QUART_SERVICE_DATA_DIR": str(data_dir),
        "QUART_SERVICE_REFRESH_INTERVAL": str(INTERVAL),
        "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
        # One log line per poll would be most of the log and part of every request.
        "QUART_SERVICE_ACCESS_LOG": "0",
    }


# -- /proc ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # Fields after "comm)": state is field 3, utime 14, stime 15.
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def smaps_rollup(pid: int) -> dict[str, int]:
    """The lines of /proc/PID/smaps_rollup, in kB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        found[name.strip()] = int(value.split()[0])
    return found


def own_cpu() -> float:
    """This process's utime + stime (every thread), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_kb(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise LookupError(name)


def _p(values: Sequence[float], percent: int) -> float:
    if len(values) < 2:
        return values[0]
    return quantiles(values, n=100, method="inclusive")[percent - 1]


# -- the database -------------------------------------------------------------------


def fill(database: Path, rows: int) -> None:
    """The service's schema, then ``big_rows`` with ``rows`` rows (~100 bytes each)."""
    apply_migrations(database)
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute(
            "CREATE TABLE big_rows (id INTEGER PRIMARY KEY, name TEXT, payload TEXT, weight REAL)"
        )
        with connection:
            connection.executemany(
                "INSERT INTO big_rows VALUES (?, ?, ?, ?)",
                ((i, f"row-{i:07d}", f"{i:08x}" * 9, float(i % 1000)) for i in range(1, rows + 1)),
            )


def write_json(database: Path, path: Path) -> None:
    """The old publication format: every row as one JSON array of objects."""
    with (
        contextlib.closing(sqlite3.connect(database)) as connection,
        path.open("w") as out,
    ):
        connection.row_factory = sqlite3.Row
        cursor = connection.execute(BIG.query or "")
        out.write("[")
        first = True
        while chunk := cursor.fetchmany(10_000):
            out.write(("" if first else ",") + json.dumps([dict(r) for r in chunk])[1:-1])
            first = False
        out.write("]")


def json_probe(path: Path) -> dict[str, float]:
    """In a fresh process: what a follower paid per swap with the JSON file."""
    gc.collect()
    rss_before = _status_kb("VmRSS")
    started, cpu = time.perf_counter(), time.process_time()
    text = path.read_bytes()
    read_cpu = time.process_time() - cpu
    rows = json.loads(text)
    by_id = {row["id"]: row for row in rows}
    parse_cpu = time.process_time() - cpu - read_cpu
    wall = time.perf_counter() - started
    del text, rows
    gc.collect()
    return {
        "rows": len(by_id),
        "read_cpu": read_cpu,
        "parse_cpu": parse_cpu,
        "wall": wall,
        "rss_growth_kb": _status_kb("VmRSS") - rss_before,
        "peak_growth_kb": _status_kb("VmHWM") - rss_before,
    }


def run_json_probe(path: Path) -> dict[str, float]:
    answer = subprocess.run(
        [sys.executable, "-m", "bench.datasets", "--json-probe", str(path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result: dict[str, float] = json.loads(answer.stdout)
    return result


def file_parts(path: Path) -> dict[str, int]:
    """Bytes of each b-tree of a published file (the table, the key index...)."""
    uri = f"file:{path}?mode=ro&immutable=1"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
        rows = connection.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")
        return {str(name): int(size) for name, size in rows}


def _nothing(view: DatasetView[None]) -> None:
    return None


def open_cost(path: Path, rows: int, times: int = 20) -> float:
    """CPU seconds a follower spends making a view of a published file (open, mmap
    size, first keyed read), measured here: the part of a swap that depends on the
    file."""
    started = time.process_time()
    for n in range(times):
        view = DatasetView(
            BIG.name,
            n,
            path,
            columns=("id", "name", "payload", "weight"),
            rows=rows,
            key=BIG.key,
            loaded_at=time.time(),
            build=_nothing,
        )
        view.get(rows // 2)
        view.close()
    return (time.process_time() - started) / times


# -- the poller -----------------------------------------------------------------------


class Poller:
    """Asks every worker for its version, round after round, in a thread; records
    when each worker was first seen serving each version."""

    def __init__(self, clients: dict[int, httpx.Client], period: float = POLL_PERIOD) -> None:
        self._clients = clients
        self._period = period
        self.current: dict[int, int] = {}
        self.first_seen: dict[int, dict[int, float]] = {pid: {} for pid in clients}
        self.requests = dict.fromkeys(clients, 0)
        self.error: BaseException | None = None
        self.paused = threading.Event()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.paused.is_set():
                    self._stop.wait(self._period)
                    continue
                for pid, client in self._clients.items():
                    answer = client.get("/ds/version")
                    answer.raise_for_status()
                    version = int(answer.json()["version"])
                    now = time.monotonic()
                    self.requests[pid] += 1
                    if self.current.get(pid) != version:
                        with self._changed:
                            self.current[pid] = version
                            self.first_seen[pid].setdefault(version, now)
                            self._changed.notify_all()
                self._stop.wait(self._period)
        except BaseException as exc:
            self.error = exc
            with self._changed:
                self._changed.notify_all()

    def wait(self, done: Callable[[dict[int, int]], bool], timeout: float) -> dict[int, int]:
        """Until ``done(current versions)``; the versions then."""

        def check() -> bool:
            return self.error is not None or (
                len(self.current) == len(self._clients) and done(self.current)
            )

        with self._changed:
            reached = self._changed.wait_for(check, timeout)
            current = dict(self.current)
        if self.error is not None:
            raise RuntimeError(f"the poller failed: {self.error!r}") from self.error
        if not reached:
            raise TimeoutError(f"not within {timeout} s; workers serve {current}")
        return current

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- one size -------------------------------------------------------------------------


@dataclass
class Result:
    size: int
    changes: int
    file_bytes: int = 0
    file_parts: dict[str, int] = field(default_factory=dict)
    first_version_s: float = 0.0
    leader: int = 0
    last_delays: list[float] = field(default_factory=list)
    worker_delays: dict[int, list[float]] = field(default_factory=dict)
    swaps: dict[int, int] = field(default_factory=dict)
    change_seconds: float = 0.0
    cpu_changes: dict[int, float] = field(default_factory=dict)
    cpu_idle: dict[int, float] = field(default_factory=dict)
    idle_seconds: float = 0.0
    cpu_quiet: dict[int, float] = field(default_factory=dict)
    quiet_seconds: float = 0.0
    polls_changes: dict[int, int] = field(default_factory=dict)
    polls_idle: dict[int, int] = field(default_factory=dict)
    memory_before: dict[int, dict[str, int]] = field(default_factory=dict)
    memory_after: dict[int, dict[str, int]] = field(default_factory=dict)
    scan_seconds: dict[int, float] = field(default_factory=dict)
    json: dict[str, float] = field(default_factory=dict)
    json_bytes: int = 0
    copy_seconds: float = 0.0
    open_seconds: float = 0.0
    bench_cpu: dict[str, float] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    log_problems: list[str] = field(default_factory=list)
    publishes: int = 0

    def baseline(self, pid: int) -> float:
        """What the worker would have spent over the change loop without changes: its
        CPU per second without polling (the quiet period) times the loop's duration,
        plus its CPU per poll request (the idle period, less the per-second part)
        times the poll requests it served during the loop."""
        per_second = self.cpu_quiet[pid] / self.quiet_seconds
        per_poll = (self.cpu_idle[pid] - per_second * self.idle_seconds) / self.polls_idle[pid]
        return per_second * self.change_seconds + per_poll * self.polls_changes[pid]

    def per_swap_ms(self, pid: int) -> float:
        """Worker CPU per swap, minus the baseline."""
        return (self.cpu_changes[pid] - self.baseline(pid)) * 1000 / max(self.swaps[pid], 1)

    @property
    def followers(self) -> list[int]:
        return [pid for pid in self.cpu_changes if pid != self.leader]


@contextlib.contextmanager
def phase(result: Result, name: str) -> Iterator[None]:
    cpu, wall = own_cpu(), time.monotonic()
    try:
        yield
    finally:
        result.bench_cpu[name] = own_cpu() - cpu
        result.phase_seconds[name] = time.monotonic() - wall


def _version(client: httpx.Client) -> int | None:
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
        answer = client.get("/ds/version")
        if answer.status_code == 200:
            return int(answer.json()["version"])
    return None


def _all_above(version: int) -> Callable[[dict[int, int]], bool]:
    return lambda versions: min(versions.values()) > version


def measure(size: int, changes: int, seed: int) -> Result:
    result = Result(size, changes)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bench-datasets-") as tmp:
        root = Path(tmp)
        data_dir = root / "data"
        database = data_dir / "quart_service.db"
        with phase(result, "fill"):
            fill(database, size)
        with contextlib.ExitStack() as stack:
            with phase(result, "start"):
                started = time.monotonic()
                server = stack.enter_context(
                    running_server(
                        root,
                        app="bench.datasets_app:app",
                        workers=WORKERS,
                        env=_env(data_dir),
                        start_timeout=120,
                    )
                )
                clients = pin_workers(server, WORKERS)
            try:
                run_size(result, server, clients, database, data_dir, rng, started)
            finally:
                for client in clients.values():
                    client.close()
        result.log_problems = _log_problems(server)
        result.publishes = server.log().count("published snapshot generation")
        with phase(result, "copy"):
            copied = time.perf_counter()
            copy_query(database, 5.0, BIG.query or "", root / "copy.sqlite", BIG.key)
            result.copy_seconds = time.perf_counter() - copied
        with phase(result, "json"):
            json_path = root / "big.json"
            write_json(database, json_path)
            result.json_bytes = json_path.stat().st_size
            result.json = run_json_probe(json_path)
    return result


def run_size(
    result: Result,
    server: Server,
    clients: dict[int, httpx.Client],
    database: Path,
    data_dir: Path,
    rng: random.Random,
    started: float,
) -> None:
    pids = sorted(clients)
    with phase(result, "first version"):
        for client in clients.values():
            wait_for(functools.partial(_version, client), "version 1 of 'big'", timeout=300)
        result.first_version_s = time.monotonic() - started
    for pid, client in clients.items():
        if client.get("/debug/identity").json()["data"]["role"] == "leader":
            result.leader = pid
    with Poller(clients) as poller:
        time.sleep(1.0)  # the poller's first rounds, past any start-up work
        current = poller.wait(lambda v: len(set(v.values())) == 1, timeout=30)
        base = next(iter(current.values()))
        versions_at_start = {pid: len(poller.first_seen[pid]) for pid in pids}
        requests = dict(poller.requests)
        with phase(result, "changes"):
            cpu = {pid: cpu_seconds(pid) for pid in pids}
            began = time.monotonic()
            with contextlib.closing(sqlite3.connect(database, timeout=30)) as connection:
                for _ in range(result.changes):
                    # A random moment in the leader's poll period.
                    time.sleep(rng.uniform(0, INTERVAL))
                    row = rng.randint(1, result.size)
                    connection.execute(
                        "UPDATE big_rows SET weight = weight + 1 WHERE id = ?", (row,)
                    )
                    connection.commit()
                    committed = time.monotonic()
                    seen = poller.wait(_all_above(base), timeout=120)
                    newest = max(seen.values())
                    poller.wait(_all_above(newest - 1), timeout=120)
                    delays = {}
                    for pid in pids:
                        first = min(v for v in poller.first_seen[pid] if v > base)
                        delays[pid] = poller.first_seen[pid][first] - committed
                        result.worker_delays.setdefault(pid, []).append(delays[pid])
                    result.last_delays.append(max(delays.values()))
                    base = newest
            result.change_seconds = time.monotonic() - began
            result.cpu_changes = {pid: cpu_seconds(pid) - cpu[pid] for pid in pids}
        result.swaps = {pid: len(poller.first_seen[pid]) - versions_at_start[pid] for pid in pids}
        result.polls_changes = {pid: poller.requests[pid] - requests[pid] for pid in pids}
        requests = dict(poller.requests)
        swaps_so_far = {pid: len(poller.first_seen[pid]) for pid in pids}
        with phase(result, "idle"):
            cpu = {pid: cpu_seconds(pid) for pid in pids}
            began = time.monotonic()
            time.sleep(result.change_seconds)
            result.idle_seconds = time.monotonic() - began
            result.cpu_idle = {pid: cpu_seconds(pid) - cpu[pid] for pid in pids}
        result.polls_idle = {pid: poller.requests[pid] - requests[pid] for pid in pids}
        poller.paused.set()
        with phase(result, "quiet"):
            time.sleep(0.2)
            cpu = {pid: cpu_seconds(pid) for pid in pids}
            began = time.monotonic()
            time.sleep(min(result.change_seconds, QUIET_MAX))
            result.quiet_seconds = time.monotonic() - began
            result.cpu_quiet = {pid: cpu_seconds(pid) - cpu[pid] for pid in pids}
        if {pid: len(poller.first_seen[pid]) for pid in pids} != swaps_so_far:
            raise RuntimeError(f"a swap during the idle period: {poller.first_seen}")
    with phase(result, "scan"):
        result.memory_before = {pid: smaps_rollup(pid) for pid in pids}
        for pid, client in clients.items():
            answer = client.get("/ds/scan", timeout=600).json()
            if answer["rows"] != result.size or answer["version"] != base:
                raise RuntimeError(f"scan of worker {pid}: {answer}")
            result.scan_seconds[pid] = float(answer["seconds"])
        result.memory_after = {pid: smaps_rollup(pid) for pid in pids}
    published = data_dir / "datasets" / BIG.name / f"{base}.sqlite"
    result.file_bytes = published.stat().st_size
    result.file_parts = file_parts(published)
    result.open_seconds = open_cost(published, result.size)


def _log_problems(server: Server) -> list[str]:
    words = ("WARNING", "ERROR", "Traceback", "CRITICAL", "exited")
    return [line for line in server.log().splitlines() if any(w in line for w in words)]


# -- output ---------------------------------------------------------------------------


def _mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def _growth(r: Result, name: str) -> list[float]:
    """Per worker, how much a smaps_rollup line grew over the scan (kB)."""
    return [
        r.memory_after[pid].get(name, 0) - r.memory_before[pid].get(name, 0)
        for pid in r.memory_after
    ]


def print_detail(r: Result) -> None:
    print(f"\n## {r.size:,} rows", flush=True)
    print(
        f"  published file {r.file_bytes / MB:.1f} MB ("
        + ", ".join(f"{name} {size / MB:.1f} MB" for name, size in r.file_parts.items())
        + f"); every worker served version 1 {r.first_version_s:.1f} s after the "
        f"server started; copy_query alone, in this process: {r.copy_seconds * 1000:.0f} ms; "
        f"opening a view of it (+ one get), in this process: {r.open_seconds * 1000:.2f} ms CPU"
    )
    print(
        f"  {r.changes} changes in {r.change_seconds:.1f} s; idle (polled, no change) "
        f"{r.idle_seconds:.1f} s; quiet (no polling) {r.quiet_seconds:.1f} s; poll requests "
        f"changes/idle {sum(r.polls_changes.values())}/{sum(r.polls_idle.values())}"
    )
    for pid in sorted(r.cpu_changes):
        role = "leader  " if pid == r.leader else "follower"
        delays = r.worker_delays[pid]
        before, after = r.memory_before[pid], r.memory_after[pid]
        print(
            f"  {role} {pid}: visible p50 {median(delays) * 1000:.0f} ms "
            f"max {max(delays) * 1000:.0f} ms; swaps {r.swaps[pid]}; CPU ms changes "
            f"{r.cpu_changes[pid] * 1000:.0f}, idle {r.cpu_idle[pid] * 1000:.0f}, quiet "
            f"{r.cpu_quiet[pid] * 1000:.0f}, baseline {r.baseline(pid) * 1000:.0f} "
            f"-> {r.per_swap_ms(pid):.1f} ms/swap; scan {r.scan_seconds[pid]:.2f} s"
        )
        print(
            "      smaps_rollup MB before -> after the scans: "
            + ", ".join(
                f"{k} {_mb(before.get(k, 0))}->{_mb(after.get(k, 0))}"
                for k in (
                    "Rss",
                    "Pss",
                    "Pss_File",
                    "Pss_Anon",
                    "Shared_Clean",
                    "Shared_Dirty",
                    "Private_Clean",
                    "Private_Dirty",
                )
                if k in after
            )
        )
    j = r.json
    print(
        f"  old format: JSON {r.json_bytes / MB:.1f} MB, read {j['read_cpu'] * 1000:.0f} ms CPU, "
        f"json.loads + dict by id {j['parse_cpu'] * 1000:.0f} ms CPU "
        f"({j['wall'] * 1000:.0f} ms wall), RSS +{_mb(j['rss_growth_kb'])} MB "
        f"(peak +{_mb(j['peak_growth_kb'])} MB)"
    )
    print(
        "  bench process CPU ms (wall s): "
        + ", ".join(
            f"{name} {r.bench_cpu[name] * 1000:.0f} ({r.phase_seconds[name]:.1f})"
            for name in r.bench_cpu
        )
    )
    print(f"  server log: {r.publishes} 'published snapshot' lines")
    if r.log_problems:
        print(f"  server log: {len(r.log_problems)} warning/error lines, first ones:")
        for line in r.log_problems[:10]:
            print(f"    {line}")


def print_table(results: list[Result]) -> None:
    print(
        f"\n{WORKERS} workers, refresh_interval {INTERVAL:g} s, a poll round every "
        f"{POLL_PERIOD * 1000:.0f} ms. vis: commit -> every worker serves the change (s). "
        "CPU: ms per swap, less the baseline. Scan: growth over each worker reading every "
        "row, MB per worker (and the 4 workers' Pss together). JSON: the old format, per "
        "follower per swap. bench: the load generator's CPU, % of one core, changes/idle."
    )
    head = (
        f"{'rows':>9} {'file MB':>7} {'chg':>3} {'vis p50':>7} {'vis p99':>7} {'vis max':>7} "
        f"{'leader ms':>9} {'follower ms':>15} {'scan +Rss':>9} {'+Pss':>6} {'+Pss x4':>7} "
        f"{'Pss/wkr':>7} {'JSON ms':>7} {'JSON MB':>7} {'bench %':>9}"
    )
    print(head)
    for r in results:
        followers = [r.per_swap_ms(pid) for pid in r.followers]
        pss = [m["Pss"] for m in r.memory_after.values()]
        busy = [100 * r.bench_cpu[name] / r.phase_seconds[name] for name in ("changes", "idle")]
        print(
            f"{r.size:9d} {r.file_bytes / MB:7.1f} {r.changes:3d} "
            f"{median(r.last_delays):7.2f} {_p(r.last_delays, 99):7.2f} {max(r.last_delays):7.2f} "
            f"{r.per_swap_ms(r.leader):9.0f} "
            f"{mean(followers):6.1f} (≤{max(followers):5.1f}) "
            f"{mean(_growth(r, 'Rss')) / 1024:9.1f} {mean(_growth(r, 'Pss')) / 1024:6.1f} "
            f"{sum(_growth(r, 'Pss')) / 1024:7.1f} {mean(pss) / 1024:7.1f} "
            f"{r.json['parse_cpu'] * 1000:7.0f} {r.json['rss_growth_kb'] / 1024:7.1f} "
            f"{busy[0]:4.0f}/{busy[1]:<4.0f}"
        )


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", default="1000,100000,1000000", help="rows, comma-separated")
    parser.add_argument(
        "--changes",
        default="20,20,5",
        help="changes per size, comma-separated (one number: the same for every size)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json-probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json_probe is not None:
        print(json.dumps(json_probe(args.json_probe)))
        return
    sizes = _ints(args.sizes)
    changes = _ints(args.changes)
    if len(changes) == 1:
        changes *= len(sizes)
    if len(changes) != len(sizes):
        parser.error("--changes: one number, or one per size")
    print(f"python -m bench.datasets --sizes {args.sizes} --changes {args.changes}")
    results = []
    for size, count in zip(sizes, changes, strict=True):
        result = measure(size, count, args.seed)
        print_detail(result)
        results.append(result)
    print_table(results)


if __name__ == "__main__":
    main()
