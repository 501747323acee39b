"""``quart-service serve`` sizes itself by the rule and says so at start-up (a real
supervisor and worker, pinned to one CPU with ``taskset``: the CPUs come from the
process's affinity, not ``os.cpu_count()``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.server import ROOT, Server, free_port, server_env, wait_for

pytestmark = pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")


def test_serve_without_a_worker_count_runs_the_rules_sizes_and_logs_why(
    tmp_path: Path,
) -> None:
    config = tmp_path / "hypercorn.toml"  # no `workers`: the rule decides
    config.write_text('worker_class = "uvloop"\n')
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = server_env(
        {
            "QUART_SERVICE_DATA_DIR": str(tmp_path / "data"),
            "QUART_SERVICE_WORKLOAD": "cpu",
            "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
        }
    )
    command = [
        "taskset", "-c", "0",
        sys.executable, "-m", "quart_service.server.cli", "serve",
        "--config", str(config), "--bind", f"127.0.0.1:{port}", "quart_service.app:app",
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = Server(process, port, log_path)
    try:
        wait_for(lambda: "Running on" in server.log(), "the worker serves", timeout=30)
        log = server.log()
        assert (
            "serving with 1 worker x 2 pool threads (1 worker for 1 CPU (one GIL each); "
            "2 pool threads each: workload cpu, Python holds the GIL" in log
        )
        (worker,) = server.worker_pids()
        assert f"worker {worker}: pool of 2 threads (" in log
        identity = httpx.get(server.url + "/debug/identity", timeout=10).json()
        assert identity["executor"]["max_threads"] == 2
        assert identity["worker"]["native_threads"]["cpus"] == 1
    finally:
        assert server.stop() == 0
