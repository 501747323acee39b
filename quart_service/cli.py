"""The ``quart-service`` command: operator tools around the service.

``quart-service check`` validates the settings (environment and TOML file) and prints
them; it exits 2 with the offending key named when they are bad. Run it before
``hypercorn``: Hypercorn 0.18 can exit 0 when all of its workers fail at start-up.
"""

from __future__ import annotations

import sys

import click

from .errors import SettingsError
from .settings import ENV_PREFIX, Settings

__all__ = ["main"]


@click.group()
@click.version_option(package_name="quart_service")
def main() -> None:
    """quart_service: an async streaming web service for AI workloads."""


@main.command()
def check() -> None:
    """Validate the settings and print the effective values."""
    settings = _settings_or_exit()
    width = max(len(ENV_PREFIX + name) for name, *_ in settings.describe())
    for name, _type, value, _doc in settings.describe():
        click.echo(f"{(ENV_PREFIX + name.upper()).ljust(width)}  {value!r}")
    click.echo("settings ok")


@main.command()
def migrate() -> None:
    """Apply pending database migrations (safe while workers run or start)."""
    from .data.migrations import apply_migrations, schema_status

    settings = _settings_or_exit()
    database = settings.database_file
    applied = apply_migrations(database, settings.database_busy_timeout)
    for migration in applied:
        click.echo(f"applied {migration.path.name}")
    status = schema_status(database, settings.database_busy_timeout)
    click.echo(f"{database}: schema at version {status.current} (latest {status.latest})")


def _settings_or_exit() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        click.echo(f"quart_service: bad settings: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
