"""The wheel carries the migrations: an installed service finds its schema.

The revision scripts live in the repository's top-level ``migrations/`` folder; the
package sees them as ``quart_service/migrations`` (a link in the checkout, real files in
the wheel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .support.server import ROOT


@pytest.mark.slow
def test_an_installed_wheel_migrates_a_fresh_database_outside_the_checkout(
    tmp_path: Path,
) -> None:
    # Build from a copy of what git sees (tracked and new files, not ignored ones): a
    # stale build/ folder in the checkout would leak old files into the wheel.
    source = tmp_path / "source"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, timeout=60,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        origin = ROOT / name
        if origin.is_symlink() or origin.is_file():
            target = source / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_symlink():
                target.symlink_to(os.readlink(origin))
            else:
                shutil.copy2(origin, target)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(wheels), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("quart_service-*.whl")
    scripts = sorted(p.name for p in (ROOT / "migrations").glob("*.py"))
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(
            Path(name).name
            for name in archive.namelist()
            if name.startswith("quart_service/migrations/") and name.endswith(".py")
        )
    assert shipped == scripts

    # A fresh environment; the dependencies come from this interpreter's site-packages,
    # the service itself only from the wheel.
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
        check=True, timeout=120,
    )  # fmt: skip
    python = venv / "bin" / "python"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("QUART_SERVICE_") and key != "PYTHONPATH"
    }
    # Without PYTHONPATH for pip too: a checkout on it, with the egg-info that building
    # the wheel left there, reads as "already installed" and pip installs nothing.
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    env["QUART_SERVICE_DATA_DIR"] = str(elsewhere / "data")
    where = subprocess.run(
        [str(python), "-c", "import quart_service; print(quart_service.__file__)"],
        cwd=elsewhere, env=env, check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(venv))
    migrate = subprocess.run(
        [str(venv / "bin" / "quart-service"), "migrate"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr
    latest = len(scripts)
    assert f"applied {scripts[0]} (service)" in migrate.stdout
    assert f"service schema at version {latest} (latest {latest})" in migrate.stdout
    assert (elsewhere / "data" / "quart_service.db").exists()
