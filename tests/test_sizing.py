"""The rule the default sizes follow: workers and pool threads for given CPUs and a
workload hint (quart_service.sizing; docs/process-model.md, "Choosing workers and
threads"). Pure: no server, no /proc."""

from __future__ import annotations

from pathlib import Path

import pytest

from quart_service import Settings, SettingsError
from quart_service.native_threads import available_cpus
from quart_service.sizing import recommend


@pytest.mark.parametrize(
    ("cpus", "workload", "workers", "threads"),
    [
        (1, "mixed", 1, 16),
        (2, "mixed", 2, 16),
        (2, "io", 2, 32),
        (2, "cpu", 2, 2),
        (2, "native", 2, 2),
        (8, "io", 8, 32),
        (8, "cpu", 8, 2),
        (8, "native", 8, 2),
        (64, "mixed", 64, 16),
        (1, "native", 1, 2),
        (3, "native", 3, 2),
    ],
)
def test_the_rule_for_a_host_and_a_workload(
    cpus: int, workload: str, workers: int, threads: int
) -> None:
    sizing = recommend(cpus, workload)
    assert (sizing.workers, sizing.threads) == (workers, threads)
    assert sizing.workers_from == "rule"
    assert sizing.threads_from == "rule"


def test_what_the_operator_set_is_kept_and_the_rest_follows_the_rule() -> None:
    sizing = recommend(8, "native", workers=2)
    # The native budget is the CPUs per worker: 4 threads for numpy, one job more.
    assert (sizing.workers, sizing.threads) == (2, 5)
    assert sizing.workers_from == "operator"
    assert recommend(8, "cpu", threads=12).threads == 12
    assert recommend(8, "cpu", threads=12).threads_from == "operator"
    assert recommend(8, "cpu", threads=12).workers == 8


def test_no_cpus_counts_as_one() -> None:
    assert recommend(0, "mixed").workers == 1


def test_the_start_up_line_says_the_sizes_and_why() -> None:
    line = recommend(2, "cpu").describe()
    assert line.startswith("2 workers x 2 pool threads (")
    assert "2 CPUs" in line
    assert "workload cpu" in line
    assert "GIL" in line
    assert recommend(1, "io").describe().startswith("1 worker x 32 pool threads")
    assert "set by the operator" in recommend(4, "io", workers=3).describe()
    assert "(executor_threads)" in recommend(4, "io", threads=7).describe()


def test_an_unknown_workload_is_refused() -> None:
    with pytest.raises(ValueError, match="workload must be one of"):
        recommend(2, "gpu")
    with pytest.raises(SettingsError, match="'workload'"):
        Settings.from_env({"QUART_SERVICE_WORKLOAD": "gpu"})


def test_settings_default_to_the_rule() -> None:
    settings = Settings()
    assert settings.executor_threads == 0  # the rule chooses
    assert settings.workload == "mixed"
    assert Settings.from_env({"QUART_SERVICE_WORKLOAD": "cpu"}).workload == "cpu"


def test_a_bigger_host_is_its_affinity_lowered_to_its_cgroup_quota(tmp_path: Path) -> None:
    """A 4-CPU quota on a 64-core host: the rule sizes for 4 CPUs, not 64."""
    root = tmp_path / "cgroup"
    (root / "app").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu\n")
    (root / "app" / "cpu.max").write_text("400000 100000\n")
    me = tmp_path / "self-cgroup"
    me.write_text("0::/app\n")
    cpus = available_cpus(affinity=64, root=root, self_cgroup=me)
    assert cpus == 4
    assert (recommend(cpus, "mixed").workers, recommend(cpus, "cpu").threads) == (4, 2)
