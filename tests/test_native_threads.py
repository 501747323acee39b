"""The native thread budget: CPU detection (affinity, cgroup quota), the budget, the
caps in real processes, and the budget reaching engines and /debug/identity."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from quart.typing import TestAppProtocol as RunningApp

from quart_service import Settings, SettingsError, create_app
from quart_service.data import ModelConfig
from quart_service.engines import EngineContext, EngineHost
from quart_service.native_threads import (
    CAP_VARIABLES,
    OFF,
    affinity_cpus,
    available_cpus,
    budget_for,
    cap_native_threads,
    cgroup_cpu_limit,
    server_workers,
)
from quart_service.part import extension_key

from .support.server import server_env

# -- the cgroup quota, from files laid out as the kernel lays them out ------------------


def _v2(tmp_path: Path, self_path: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 mount at tmp_path/cgroup with ``cpu.max`` per folder, and a
    /proc/self/cgroup that puts this process at ``self_path``."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / self_path.strip("/")).mkdir(parents=True, exist_ok=True)
    for folder, value in limits.items():
        (root / folder.strip("/") / "cpu.max").write_text(value + "\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text(f"0::{self_path}\n")
    return root, self_cgroup


def test_v2_quota_is_the_smallest_on_the_way_to_the_root(tmp_path: Path) -> None:
    root, me = _v2(
        tmp_path,
        "/system.slice/app.service",
        {"/system.slice": "150000 100000", "/system.slice/app.service": "max 100000"},
    )
    assert cgroup_cpu_limit(root, me) == 1.5
    (root / "system.slice/app.service/cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_limit(root, me) == 0.5


def test_v2_without_a_quota_is_none(tmp_path: Path) -> None:
    root, me = _v2(tmp_path, "/", {"/": "max 100000"})
    assert cgroup_cpu_limit(root, me) is None
    root2, me2 = _v2(tmp_path / "no-file", "/a/b", {})
    assert cgroup_cpu_limit(root2, me2) is None


def test_v2_container_that_sees_its_own_cgroup_as_the_root(tmp_path: Path) -> None:
    # No cgroup namespace: /proc/self/cgroup names the host's path, which does not
    # exist in the container's mount; the mount's root is the container's cgroup.
    root, me = _v2(tmp_path, "/", {"/": "200000 100000"})
    me.write_text("0::/kubepods/burstable/pod1234/abcdef\n")
    assert cgroup_cpu_limit(root, me) == 2.0


def test_v1_cfs_quota_of_the_cpu_controller(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    folder = root / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("250000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    me = tmp_path / "self-cgroup"
    me.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_cpu_limit(root, me) == 2.5
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root, me) is None


def test_no_cgroup_file_is_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None


def test_available_cpus_is_the_affinity_lowered_to_the_quota_rounded_up(tmp_path: Path) -> None:
    root, me = _v2(tmp_path, "/", {"/": "250000 100000"})
    assert available_cpus(affinity=8, root=root, self_cgroup=me) == 3
    assert available_cpus(affinity=2, root=root, self_cgroup=me) == 2
    (root / "cpu.max").write_text("10000 100000\n")  # a tenth of a CPU
    assert available_cpus(affinity=8, root=root, self_cgroup=me) == 1


def test_this_host_counts_its_affinity_and_its_real_cgroup() -> None:
    cpus = available_cpus()
    assert 1 <= cpus <= affinity_cpus() == len(os.sched_getaffinity(0))
    quota = cgroup_cpu_limit()
    print(f"\naffinity {affinity_cpus()} CPUs, cgroup quota {quota}, available {cpus}")
    if quota is None:
        assert cpus == affinity_cpus()


def test_a_narrower_affinity_is_seen_where_os_cpu_count_is_not() -> None:
    probe = (
        "import os; from quart_service.native_threads import available_cpus;"
        "print(available_cpus(), os.cpu_count())"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env=server_env(),
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    available, cpu_count = map(int, result.stdout.split())
    assert available == 1
    assert cpu_count == os.cpu_count()


# -- the budget -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "cpus", "workers", "budget"),
    [
        (0, 2, 2, 1),
        (0, 8, 3, 2),  # rounded down: the workers together stay within the CPUs
        (0, 1, 4, 1),  # at least one
        (0, 4, None, 4),  # not a server's worker: counted as one
        (3, 2, 2, 3),  # the setting wins
        (OFF, 4, 2, 4),  # off: engines get every CPU, as the libraries do
    ],
)
def test_budget(setting: int, cpus: int, workers: int | None, budget: int) -> None:
    assert budget_for(setting, cpus, workers) == budget


def test_setting_is_validated() -> None:
    assert Settings.from_env({"QUART_SERVICE_NATIVE_THREADS": "-1"}).native_threads == OFF
    assert Settings().native_threads == 0
    with pytest.raises(SettingsError, match="native_threads"):
        Settings(native_threads=-2)


def _report_workers(queue: Any, config: Any) -> None:
    queue.put(server_workers({}))


def test_a_server_worker_finds_the_worker_count_in_its_config() -> None:
    # Hypercorn, quart-service serve and Uvicorn start each worker as
    # Process(target=..., kwargs={"config": config, ...}).
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(
        target=_report_workers, args=(queue,), kwargs={"config": SimpleNamespace(workers=3)}
    )
    process.start()
    process.join(timeout=30)
    assert process.exitcode == 0
    assert queue.get(timeout=5) == 3
    assert server_workers({}) is None  # the test process is no server's worker
    assert server_workers({"WEB_CONCURRENCY": "4"}) == 4
    assert server_workers({"WEB_CONCURRENCY": "many"}) is None


def test_caps_leave_the_operators_variables_and_a_non_worker_alone() -> None:
    env = {"OMP_NUM_THREADS": "3"}
    budget = cap_native_threads(0, workers=2, environ=env)
    assert budget.applied
    assert budget.operator_caps == {"OMP_NUM_THREADS": "3"}
    assert env["OMP_NUM_THREADS"] == "3"
    expected = str(max(available_cpus() // 2, 1))
    assert all(env[name] == expected for name in CAP_VARIABLES if name != "OMP_NUM_THREADS")
    # A process that is no server's worker (this one) keeps its environment.
    before = dict(os.environ)
    unapplied = cap_native_threads(0)
    assert not unapplied.applied
    assert unapplied.workers is None
    assert dict(os.environ) == before


def _in_a_process(code: str, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {k: v for k, v in server_env(extra_env).items() if k not in CAP_VARIABLES}
    env.update(extra_env or {})
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


_CAP = "from quart_service.native_threads import cap_native_threads\n"
_REPORT = "import json; print(json.dumps(budget.as_dict()))\n"


def _openblas(account: dict[str, Any]) -> int:
    threads: int = next(
        lib["num_threads"] for lib in account["libraries"] if lib["library"] == "openblas"
    )
    return threads


def test_caps_set_before_numpy_loads_keep_openblas_to_the_budget() -> None:
    cpus = affinity_cpus()
    account = _in_a_process(
        _CAP + "budget = cap_native_threads(0, workers=2)\nimport numpy\n" + _REPORT
    )
    budget = max(available_cpus() // 2, 1)
    assert account["caps"]["OPENBLAS_NUM_THREADS"] == str(budget)
    assert _openblas(account) == budget
    assert account["native_running"] == budget - 1  # OpenBLAS computes on the caller too
    print(f"\ncapped before numpy: {account['native_running']} native threads ({cpus} CPUs)")


def test_numpy_loaded_first_is_limited_by_threadpoolctl_but_keeps_its_threads() -> None:
    cpus, budget = affinity_cpus(), max(available_cpus() // 2, 1)
    account = _in_a_process(
        "import numpy\n" + _CAP + "budget = cap_native_threads(0, workers=2)\n" + _REPORT
    )
    assert _openblas(account) == budget
    if cpus > budget:
        assert account["limited_after_load"] == ["openblas"]
    # OpenBLAS started a thread per CPU when it loaded; they stay, parked.
    assert account["native_running"] == cpus - 1


def test_an_operators_cap_is_kept_for_a_library_loaded_first() -> None:
    account = _in_a_process(
        "import numpy\n" + _CAP + "budget = cap_native_threads(1, workers=2)\n" + _REPORT,
        {"OPENBLAS_NUM_THREADS": "2"},
    )
    assert account["operator_caps"] == {"OPENBLAS_NUM_THREADS": "2"}
    assert account["limited_after_load"] == []
    assert _openblas(account) == min(2, affinity_cpus())


# -- the budget in the app --------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(identity_endpoint=True, data_dir=str(tmp_path / "data"), native_threads=3)


async def test_engines_get_the_budget_through_their_context(test_app: RunningApp) -> None:
    seen: list[EngineContext] = []

    async def probe(model: ModelConfig, context: EngineContext) -> Any:
        seen.append(context)
        return SimpleNamespace()

    host: EngineHost = test_app.app.extensions[extension_key("ai")]  # type: ignore[attr-defined]
    engines = await host.engines()
    engines.factories["probe"] = probe
    model = ModelConfig.from_mapping(
        {"name": "p", "engine": "probe", "parameters": {}, "enabled": True, "updated_at": "0"}
    )
    await engines.get(model)
    assert [context.native_threads for context in seen] == [3]


async def test_identity_shows_the_budget(test_app: RunningApp) -> None:
    response = await test_app.test_client().get("/debug/identity")
    native = (await response.get_json())["worker"]["native_threads"]
    assert native["budget"] == 3
    assert native["mode"] == "setting"
    # The test process is no server's worker: nothing was applied to it.
    assert native["applied"] is False
    assert native["caps"] == {}


def test_create_app_in_a_plain_process_changes_no_environment(tmp_path: Path) -> None:
    before = dict(os.environ)
    create_app(Settings(data_dir=str(tmp_path / "data")))
    assert dict(os.environ) == before
