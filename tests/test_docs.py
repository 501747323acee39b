"""The docs a newcomer follows stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from quart_service import Settings
from quart_service.config import ENV_PREFIX

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", readme)


def test_readme_opens_with_the_run_and_test_commands() -> None:
    run, test, *_ = _readme_commands()
    assert run == "pip install -e . && hypercorn --config hypercorn.toml quart_service.app:app"
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
