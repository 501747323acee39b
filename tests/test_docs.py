"""The docs a newcomer follows stay true to the code."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from quart_service import Settings
from quart_service.config import ENV_PREFIX

from .support.server import server_env

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", readme)


def test_readme_opens_with_the_run_and_test_commands() -> None:
    run, test, *_ = _readme_commands()
    # The supervised server first: plain hypercorn stops when one worker crashes.
    assert run == "pip install -e . && quart-service serve"
    assert test.startswith("pip install -e '.[test]' && ")


def test_ci_runs_the_readme_test_command() -> None:
    _, test, *_ = _readme_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


def test_configuration_reference_lists_every_setting() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    for name, _type, default, _doc in Settings().describe():
        row = next(
            (line for line in reference.splitlines() if line.startswith(f"| `{name}` |")), None
        )
        assert row is not None, f"docs/configuration.md has no row for {name}"
        assert f"`{ENV_PREFIX}{name.upper()}`" in row
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        assert shown in row, f"{name}: default {default!r} not in its row"


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_the_dockerfile_runs_the_readme_commands() -> None:
    run, *_ = _readme_commands()
    install, serve = run.split(" && ")
    instructions = _dockerfile()
    assert f"RUN {install}" in instructions
    cmd = next(i for i in instructions if i.startswith("CMD "))
    argv = json.loads(cmd.removeprefix("CMD "))  # the exec form is a JSON list
    # README's serve, reachable from outside the container.
    assert argv == [*shlex.split(serve), "--bind", "0.0.0.0:8000"]
    # serve reads hypercorn.toml from the working folder, where the source is copied.
    assert "COPY . ." in instructions
    workdir = next(i for i in instructions if i.startswith("WORKDIR "))
    assert instructions.index(workdir) < instructions.index("COPY . .")
    # Its settings are real ones, with values they accept (a typo would be refused).
    pairs = [
        p.split("=", 1) for i in instructions if i.startswith("ENV ") for p in shlex.split(i)[1:]
    ]
    env = {name: value for name, value in pairs if name.startswith(ENV_PREFIX)}
    assert env["QUART_SERVICE_DATA_DIR"] == "/var/lib/quart-service"
    assert Settings.from_env(env).data_dir == "/var/lib/quart-service"


def test_the_compose_file_has_real_settings_and_extras() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    instances = [s for s in services.values() if "build" in s or "image" in s]
    built = [s for s in instances if s.get("image") == "quart-service:local"]
    assert len(built) == 2  # two service instances besides PostgreSQL and Redis
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for service in built:
        for extra in service["build"]["args"]["EXTRAS"].split(","):
            assert extra in extras
        settings = Settings.from_env(service["environment"])  # a typo would be refused
        assert settings.database_url.startswith("postgresql://")
        assert settings.coordination_url.startswith("redis://")
        assert settings.database_url.split("@")[1].split(":")[0] in services
        assert settings.coordination_url.split("//")[1].split(":")[0] in services


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.+?)\n```", markdown, flags=re.DOTALL)


def test_the_team_blueprint_test_snippet_runs_as_written(tmp_path: Path) -> None:
    blocks = _python_blocks((ROOT / "docs" / "team-blueprints.md").read_text())
    routes = next(b for b in blocks if b.startswith("# my_team/routes.py"))
    test = next(b for b in blocks if "async def test_" in b)
    (tmp_path / "my_team").mkdir()
    (tmp_path / "my_team" / "__init__.py").write_text("")
    (tmp_path / "my_team" / "routes.py").write_text(routes + "\n")
    (tmp_path / "test_routes.py").write_text(test + "\n")
    # A pytest of its own: no asyncio_mode = "auto" from this project's settings.
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = server_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_routes.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
