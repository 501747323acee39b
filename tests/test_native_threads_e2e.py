"""The native thread budget under real servers with real worker processes.

Threads per worker stay within pool + database connections + native budget + 2
while 200 concurrent requests run matrix products on OpenBLAS (tests/apps/numeric.py);
with the budget off, OpenBLAS starts a thread per CPU in every worker. The numbers
are read from /proc (and the workers' /debug/identity) and printed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from quart_service.engines.neural.random_weights import write_random_weights
from quart_service.engines.neural.weights import GPT2Config
from quart_service.native_threads import CAP_VARIABLES, affinity_cpus, available_cpus

from .support.data import wait_all
from .support.server import Server, peak_threads, pinned_workers, running_server

APP = "tests.apps.numeric:app"
WORKERS = 2
POOL = 8
DATABASE_CONNECTIONS = 1  # the refresh leader's aiosqlite connection runs one thread
REQUESTS = 200


@pytest.fixture(autouse=True)
def _no_operator_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The servers inherit this environment: no caps of an operator in it."""
    for name in CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _env(**extra: str) -> dict[str, str]:
    return {
        "QUART_SERVICE_EXECUTOR_THREADS": str(POOL),
        "QUART_SERVICE_EXECUTOR_QUEUE": "1000",
        "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
        **extra,
    }


async def _products(url: str, total: int) -> list[int]:
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one() -> int:
            response = await client.get(f"{url}/matmul", params={"count": 1})
            return response.status_code

        return await asyncio.gather(*(one() for _ in range(total)))


def _native(server: Server) -> dict[int, dict[str, Any]]:
    """Each worker's native_threads account on /debug/identity."""
    with pinned_workers(server, WORKERS) as clients:
        return {
            pid: client.get("/debug/identity").json()["worker"]["native_threads"]
            for pid, client in clients.items()
        }


def _cpu_seconds(pids: list[int]) -> float:
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def _under_load(server: Server) -> tuple[dict[int, int], dict[int, dict[str, Any]]]:
    """Peak threads of each worker during 200 concurrent requests; then its account.
    Prints the workers' CPU time per request and the wall time (no assert on them)."""
    pids = server.worker_pids()
    cpu, started = _cpu_seconds(pids), time.monotonic()
    with peak_threads(pids) as peak:
        statuses = asyncio.run(_products(server.url, REQUESTS))
    wall, cpu = time.monotonic() - started, _cpu_seconds(pids) - cpu
    assert statuses == [200] * REQUESTS
    print(f"\n{REQUESTS} requests in {wall:.2f} s, worker CPU {cpu / REQUESTS * 1000:.1f} ms each")
    return peak, _native(server)


def _openblas_threads(native: dict[str, Any]) -> int:
    threads: int = next(
        lib["num_threads"] for lib in native["libraries"] if lib["library"] == "openblas"
    )
    return threads


@pytest.mark.slow
def test_threads_per_worker_stay_within_pool_database_and_native_budget(tmp_path: Path) -> None:
    budget = max(available_cpus() // WORKERS, 1)
    bound = POOL + DATABASE_CONNECTIONS + budget + 2
    with running_server(tmp_path, app=APP, workers=WORKERS, env=_env()) as server:
        peak, native = _under_load(server)
        log = server.log()
    print(f"budget {budget}, bound {bound}; peak threads per worker: {peak}")
    print("native threads running per worker:", {p: n["native_running"] for p, n in native.items()})
    assert all(0 < n <= bound for n in peak.values()), peak
    assert max(peak.values()) >= POOL, peak  # the load did fill the pool
    for account in native.values():
        assert account["budget"] == budget
        assert (account["mode"], account["workers"], account["applied"]) == ("auto", WORKERS, True)
        assert account["caps"]["OPENBLAS_NUM_THREADS"] == str(budget)
        assert account["caps"]["OMP_NUM_THREADS"] == str(budget)
        assert _openblas_threads(account) == budget
        # OpenBLAS computes on the calling thread too: it starts budget - 1 of its own.
        assert account["native_running"] == budget - 1
    assert log.count(f"native thread budget {budget} threads") == WORKERS


@pytest.mark.slow
def test_without_the_budget_openblas_starts_a_thread_per_cpu_in_every_worker(
    tmp_path: Path,
) -> None:
    cpus, budget = affinity_cpus(), max(available_cpus() // WORKERS, 1)
    env = _env(QUART_SERVICE_NATIVE_THREADS="-1")
    with running_server(tmp_path, app=APP, workers=WORKERS, env=env) as server:
        peak, native = _under_load(server)
    running = {p: n["native_running"] for p, n in native.items()}
    print(f"budget off; peak threads per worker: {peak}; native threads running: {running}")
    print(
        f"{cpus - budget} more native threads per worker than with the budget ({budget}) "
        f"on these {cpus} CPUs; {WORKERS} workers x {cpus} CPUs = {WORKERS * cpus} "
        f"native compute threads for {cpus} CPUs"
    )
    for account in native.values():
        assert (account["mode"], account["applied"], account["caps"]) == ("off", False, {})
        assert _openblas_threads(account) == cpus
        assert account["native_running"] == cpus - 1


@pytest.mark.slow
def test_serve_caps_a_library_the_app_module_imports_before_create_app(tmp_path: Path) -> None:
    # quart-service serve caps each worker before it imports the app module, so even
    # a library imported at the top of it starts no more threads than the budget.
    # (Under the hypercorn command, create_app() comes after the app module's own
    # imports: threadpoolctl limits such a library, which keeps the threads it
    # started; tests/test_native_threads.py shows that in a plain process.)
    budget = max(available_cpus() // WORKERS, 1)
    env = _env(TEST_NUMPY_AT_IMPORT="1")
    with running_server(tmp_path, app=APP, workers=WORKERS, env=env, command="serve") as server:
        native = _native(server)
    print(
        "\nnumpy imported before create_app() under serve; native threads running per "
        f"worker: {[n['native_running'] for n in native.values()]}"
    )
    for account in native.values():
        assert account["applied"]
        assert account["workers"] == WORKERS
        assert account["limited_after_load"] == []
        assert _openblas_threads(account) == budget
        assert account["native_running"] == budget - 1


async def _completions(url: str, total: int) -> list[int]:
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def one(n: int) -> int:
            body = {"model": "gpt", "prompt": f"request {n}", "max_tokens": 8, "temperature": 0}
            response = await client.post(f"{url}/v1/completions", json=body)
            return response.status_code

        return await asyncio.gather(*(one(n) for n in range(total)))


@pytest.mark.slow
def test_the_neural_engine_under_200_requests_stays_within_the_bound(tmp_path: Path) -> None:
    # Each request steps alone (max_batch 0): every token is a job on the pool, so the
    # 200 requests keep the pool full, the hardest case for the bound.
    weights = tmp_path / "gpt.safetensors"
    write_random_weights(
        weights, GPT2Config(n_layer=4, n_head=8, n_embd=256, vocab_size=260, n_ctx=256), seed=5
    )
    budget = max(available_cpus() // WORKERS, 1)
    bound = POOL + DATABASE_CONNECTIONS + budget + 2
    env = _env(QUART_SERVICE_ADMIN_TOKEN="token", QUART_SERVICE_REFRESH_INTERVAL="0.5")
    with running_server(tmp_path, workers=WORKERS, env=env) as server:
        parameters = {"weights": str(weights), "max_batch": 0}
        created = httpx.post(
            f"{server.url}/admin/models",
            json={"name": "gpt", "engine": "neural", "parameters": parameters},
            headers={"Authorization": "Bearer token"},
        )
        assert created.status_code == 201, created.text
        with pinned_workers(server, WORKERS) as clients:
            wait_all(clients, "/data", lambda a: "gpt" in a["models"], timeout=10)
        pids = server.worker_pids()
        with peak_threads(pids) as peak:
            statuses = asyncio.run(_completions(server.url, REQUESTS))
        native = _native(server)
    print(f"\nneural engine: budget {budget}, bound {bound}; peak threads per worker: {peak}")
    assert statuses == [200] * REQUESTS
    assert all(0 < n <= bound for n in peak.values()), peak
    assert max(peak.values()) >= POOL, peak  # the load did fill the pool
    for account in native.values():
        assert _openblas_threads(account) == budget
        assert account["native_running"] == budget - 1
