"""Settings: typed, frozen, picklable; unknown keys and bad values named at start-up."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from quart_service import Settings, SettingsError

from .support.server import free_port, server_env, spawn_hypercorn


def test_defaults_are_usable_and_picklable() -> None:
    settings = Settings()
    assert settings.executor_threads >= 0  # 0: the rule sizes the pool (sizing.py)
    assert pickle.loads(pickle.dumps(settings)) == settings
    with pytest.raises(AttributeError):
        settings.executor_threads = 3  # type: ignore[misc]


def test_environment_overrides_the_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text("executor_threads = 4\nstream_heartbeat = 2.5\nwarm_resources = true\n")
    settings = Settings.from_env(
        {
            "QUART_SERVICE_CONFIG": str(config),
            "QUART_SERVICE_EXECUTOR_THREADS": "12",
            "QUART_SERVICE_IDENTITY_ENDPOINT": "yes",
            "UNRELATED": "ignored",
        }
    )
    assert settings.executor_threads == 12
    assert settings.stream_heartbeat == 2.5
    assert settings.warm_resources is True
    assert settings.identity_endpoint is True


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"QUART_SERVICE_EXECUTOR_THREDS": "4"}, "QUART_SERVICE_EXECUTOR_THREDS"),
        ({"QUART_SERVICE_EXECUTOR_THREADS": "many"}, "QUART_SERVICE_EXECUTOR_THREADS"),
        ({"QUART_SERVICE_EXECUTOR_THREADS": "-1"}, "executor_threads"),
        ({"QUART_SERVICE_WORKLOAD": "gpu"}, "workload"),
        ({"QUART_SERVICE_STREAM_HEARTBEAT": "soon"}, "QUART_SERVICE_STREAM_HEARTBEAT"),
        ({"QUART_SERVICE_WARM_RESOURCES": "perhaps"}, "QUART_SERVICE_WARM_RESOURCES"),
        ({"QUART_SERVICE_LOG_LEVEL": "LOUD"}, "log_level"),
    ],
)
def test_bad_environment_is_refused_naming_the_key(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(environ)


def test_bad_toml_is_refused_naming_key_and_type(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text('executor_threads = "eight"\n')
    with pytest.raises(SettingsError, match=r"'executor_threads': expected an integer"):
        Settings.from_toml(config)
    config.write_text("executor_thread = 8\n")
    with pytest.raises(SettingsError, match=r"unknown setting 'executor_thread'"):
        Settings.from_toml(config)
    with pytest.raises(SettingsError, match="cannot read the settings file"):
        Settings.from_toml(tmp_path / "missing.toml")


def test_a_boolean_is_not_a_thread_count() -> None:
    with pytest.raises(SettingsError, match="executor_threads"):
        Settings.from_mapping({"executor_threads": True})
    assert Settings.from_mapping({"retry_after": 2}).retry_after == 2.0


@pytest.mark.parametrize(
    ("variable", "value"),
    [("QUART_SERVICE_EXECUTOR_THREDS", "4"), ("QUART_SERVICE_EXECUTOR_THREADS", "many")],
)
def test_hypercorn_refuses_to_start_with_bad_settings(
    tmp_path: Path, variable: str, value: str
) -> None:
    log_path = tmp_path / "hypercorn.log"
    process = spawn_hypercorn(
        "quart_service.app:app",
        port=free_port(),
        workers=2,
        env={variable: value},
        log_path=log_path,
    )
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    log = log_path.read_text()
    # The worker refuses with one line naming the key, and the server stops.
    # (Hypercorn 0.18 may still exit 0 here: it drops the workers' exit codes when
    # they all fail together, which is why `quart-service check` exists.)
    refusals = [line for line in log.splitlines() if "quart_service: bad settings:" in line]
    assert refusals
    assert all(variable in line for line in refusals)
    assert "Traceback" not in log
    # hypercorn/run.py: 0 when it finds both workers gone at once (the usual case); the
    # exit code of a worker it saw exit alone otherwise: 2 (the refusal) or -SIGTERM
    # (exit status 241) for the one it terminated. Never 1 (Hypercorn itself crashed).
    assert code in (0, 2, 241), code


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quart_service.server.cli", "check"],
        env=server_env(env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_command_names_the_bad_key() -> None:
    bad = _check({"QUART_SERVICE_STREAM_HEARTBEAT": "soon"})
    assert bad.returncode == 2
    assert "QUART_SERVICE_STREAM_HEARTBEAT: expected a number, got 'soon'" in bad.stderr
    good = _check({"QUART_SERVICE_EXECUTOR_THREADS": "7"})
    assert good.returncode == 0, good.stderr
    assert "QUART_SERVICE_EXECUTOR_THREADS 7" in " ".join(good.stdout.split())
