"""The ``quart-service`` command: operator tools around the service.

``quart-service serve`` runs the service on Hypercorn's workers under a supervisor
(see :mod:`quart_service.server.supervisor`). It logs which files it uses (the server
file, the settings file and variables, the database) and refuses to start without
its server file (``hypercorn.toml`` in the current folder, or ``--config``), rather
than run one worker on Hypercorn's defaults; ``--reload`` is the development mode
(workers replaced when a source file changes). ``--server granian|uvicorn`` checks the
settings and then execs that server instead, with the file's bind and workers and
timeouts that let the drain finish (docs/servers.md says what it does not give).
``quart-service check`` validates the settings (environment and TOML file) and
prints them; it exits 2 with the offending key named when they are bad. Run it
before ``hypercorn``: Hypercorn 0.18 can exit 0 when all of its workers fail at
start-up (https://github.com/pgjones/hypercorn/issues/269).
``quart-service migrate`` applies the pending migrations of the service (then of each
team plugin), ``--status`` prints where each source stands, and ``--to N [--source
NAME]`` moves one source down or up to version N; one line per action.
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from ..config import ENV_PREFIX, Settings
from ..errors import MigrationError, SettingsError
from ..observability.logs import configure_logging
from ._reload import FileWatch

if TYPE_CHECKING:
    from hypercorn.config import Config

    from ..plugins.loader import LoadedPlugins

__all__ = ["main", "other_server_argv"]

# The server settings ``serve`` reads by default, from the current folder.
_SERVER_FILE = "hypercorn.toml"
# Servers that ``serve --server`` hands over to (docs/servers.md).
_OTHER_SERVERS = ("granian", "uvicorn")


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
@click.argument("app", default="quart_service.app:app")
@click.option(
    "--server",
    type=click.Choice(["hypercorn", *_OTHER_SERVERS]),
    default="hypercorn",
    show_default=True,
    help="granian or uvicorn: check the settings, then become that server's own process "
    "manager with the file's bind, workers and backlog and timeouts that let the drain "
    "finish (docs/servers.md: what it does not give).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Hypercorn settings (TOML): bind, workers, timeouts. Default: hypercorn.toml "
    "in the current folder; serve refuses to start without it.",
)
@click.option("--bind", "-b", multiple=True, help="Address to listen on (overrides the file).")
@click.option("--workers", "-w", type=click.IntRange(min=1), help="Worker processes.")
@click.option(
    "--max-start-failures",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Give up after this many workers in a row exit before serving.",
)
@click.option(
    "--shared-socket",
    is_flag=True,
    help="All workers accept on one listening socket (plain Hypercorn's way) instead "
    "of one SO_REUSEPORT socket each; the kernel then does not balance them.",
)
@click.option(
    "--reload",
    is_flag=True,
    help="Development mode: replace the workers one at a time when a .py file under "
    "--reload-dir (or the settings file) changes.",
)
@click.option(
    "--reload-dir",
    "reload_dirs",
    multiple=True,
    type=click.Path(file_okay=False, exists=True),
    help="A folder --reload watches (repeatable). Default: the current folder and the "
    "folder of the quart_service package.",
)
def serve(
    app: str,
    server: str,
    config_path: str | None,
    bind: tuple[str, ...],
    workers: int | None,
    max_start_failures: int,
    shared_socket: bool,
    reload: bool,
    reload_dirs: tuple[str, ...],
) -> None:
    """Serve APP with supervised Hypercorn workers (replaced when they die), or hand over
    to Granian's or Uvicorn's own process manager (--server)."""
    import logging
    import os

    from hypercorn.config import Config

    from ..config import CONFIG_ENV, settings_sources
    from ..native_threads import WORKERS_ENV
    from ..observability.metrics import enable_multiprocess
    from ..sizing import for_this_host
    from .supervisor import Supervisor

    settings = _settings_or_exit()
    configure_logging(settings.log_level, settings.log_format)
    path = Path(config_path or _SERVER_FILE)
    if not path.is_file():
        _refuse_without_server_file(path, given=config_path is not None)
    try:
        config = Config.from_toml(path)
    except Exception as exc:  # Hypercorn raises whatever TOML parsing or its setters raise
        click.echo(f"quart_service: bad server config {path}: {exc}", err=True)
        sys.exit(2)
    log = logging.getLogger("quart_service.serve")
    log.info("server settings from %s", path.resolve())
    log.info(
        "service settings from %s; database %s",
        "; ".join(settings_sources()),
        "PostgreSQL (database_url)" if settings.database_url else settings.database_file.resolve(),
    )
    config.application_path = app
    if bind:
        config.bind = list(bind)
    # The worker count: --workers, else the file's, else the rule's (one per CPU).
    sizing = for_this_host(
        settings.workload,
        workers=workers or _file_workers(path),
        threads=settings.executor_threads,
    )
    config.workers = sizing.workers
    log.info("serving with %s", sizing.describe())
    if server != "hypercorn":
        if reload:
            raise click.UsageError("--reload goes with the Hypercorn workers, not --server")
        argv = other_server_argv(server, app, config, settings.stream_drain_timeout)
        # How each worker learns the worker count for its native thread budget:
        # Granian's workers carry no config we can read (quart_service.native_threads).
        os.environ[WORKERS_ENV] = str(config.workers)
        click.echo(f"quart_service: exec {shlex.join(argv)}", err=True)
        os.execv(argv[0], argv)
    if config.graceful_timeout < settings.stream_drain_timeout + 1:
        # Hypercorn would cancel open streams before the drain sends their last event.
        config.graceful_timeout = settings.stream_drain_timeout + 1
    if settings.metrics:
        enable_multiprocess(settings.metrics_root)
    watch = None
    if reload:
        folders = [Path(d) for d in reload_dirs] or [Path.cwd(), Path(__file__).parents[1]]
        settings_file = os.environ.get(CONFIG_ENV)
        watch = FileWatch(folders, [Path(settings_file)] if settings_file else [])
    supervisor = Supervisor(
        config,
        drain_timeout=settings.stream_drain_timeout,
        max_start_failures=max_start_failures,
        count_metrics=settings.metrics,
        socket_per_worker=not shared_socket,
        watch=watch,
    )
    sys.exit(supervisor.run())


@main.command()
@click.option(
    "--status",
    "show_status",
    is_flag=True,
    help="Print each source's schema version and latest; change nothing.",
)
@click.option(
    "--to",
    "target",
    type=click.IntRange(min=0),
    help="Move one source to version N, down or up (0: before its first migration).",
)
@click.option(
    "--source",
    "source_name",
    default="service",
    show_default=True,
    help="The source that --to moves.",
)
def migrate(show_status: bool, target: int | None, source_name: str) -> None:
    """Apply pending database migrations (safe while workers run or start): the
    service's, then each team plugin's."""
    from ..data.database import redact
    from ..data.markers import watch_tables
    from ..data.migrations import SERVICE, apply_migrations, migrate_to, schema_status
    from ..data.models import MODELS

    if show_status and target is not None:
        raise click.UsageError("--status and --to do not go together")
    if source_name != "service" and target is None:
        raise click.UsageError("--source goes with --to")
    settings = _settings_or_exit()
    database, timeout = settings.database_target, settings.database_busy_timeout
    plugins = _installed_plugins(settings)
    sources = [SERVICE, *plugins.migration_sources()]
    failed = False
    try:
        if target is not None:
            source = next((s for s in sources if s.name == source_name), None)
            if source is None:
                known = ", ".join(s.name for s in sources)
                click.echo(
                    f"quart_service: no migration source {source_name!r} (known: {known})",
                    err=True,
                )
                sys.exit(2)
            before = schema_status(database, timeout, [source]).current
            verb = "reverted" if target < before else "applied"
            for migration in migrate_to(database, timeout, source, target):
                click.echo(f"{verb} {migration.path.name} ({migration.source})")
        elif not show_status:

            def report(_source: object, error: MigrationError) -> None:
                nonlocal failed
                failed = True
                click.echo(f"quart_service: {error}", err=True)

            for migration in apply_migrations(database, timeout, sources, on_failure=report):
                click.echo(f"applied {migration.path.name} ({migration.source})")
            # The revision triggers of the tables the service's and the plugins'
            # datasets read (an app's own datasets are watched when its workers start).
            tables = {t for d in [MODELS, *plugins.datasets] for t in d.tables}
            for table, error in watch_tables(database, timeout, tables).items():
                click.echo(f"quart_service: table {table!r} cannot be watched: {error}", err=True)
        status = schema_status(database, timeout, sources)
    except MigrationError as exc:
        click.echo(f"quart_service: {exc}", err=True)
        sys.exit(1)
    shown = redact(database) if isinstance(database, str) else database
    for name, (current, latest) in status.sources.items():
        click.echo(f"{shown}: {name} schema at version {current} (latest {latest})")
    if failed:
        sys.exit(1)


def other_server_argv(server: str, app: str, config: Config, drain_timeout: float) -> list[str]:
    """The command line that runs ``app`` under Granian or Uvicorn as ``config`` (one TCP
    address, no TLS) says: their process managers replace crashed workers, and their
    graceful limits stay above the drain so that it ends the streams."""
    if len(config.bind) != 1 or config.ssl_enabled:
        raise click.UsageError(f"--server {server} takes one plain TCP --bind and no TLS")
    host, _, port = config.bind[0].rpartition(":")
    if not host or not port.isdigit() or host.startswith(("unix:", "fd:")):
        raise click.UsageError(f"--server {server} takes --bind HOST:PORT, not {config.bind[0]}")
    loop = "uvloop" if config.worker_class == "uvloop" else "asyncio"
    # The drain, the handover to the server's own shutdown, and a margin.
    graceful = str(math.ceil(drain_timeout) + 5)
    common = [
        "--host", host.strip("[]"), "--port", port,
        "--workers", str(config.workers), "--backlog", str(max(config.backlog, 128)),
    ]  # fmt: skip
    if server == "granian":
        return [
            sys.executable, "-m", "granian", "--interface", "asgi", "--loop", loop, *common,
            "--respawn-failed-workers", "--workers-kill-timeout", graceful, app,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "uvicorn", "--loop", loop, "--http", "httptools", *common,
        "--lifespan", "on", "--timeout-graceful-shutdown", graceful,
        "--timeout-keep-alive", str(math.ceil(config.keep_alive_timeout)),
        # The service writes its own access log (QUART_SERVICE_ACCESS_LOG).
        "--no-access-log", app,
    ]  # fmt: skip


def _file_workers(config_path: Path) -> int | None:
    """The ``workers`` the server's TOML file sets, if it sets it."""
    import tomllib

    try:
        with config_path.open("rb") as handle:
            workers = tomllib.load(handle).get("workers")
    except (OSError, tomllib.TOMLDecodeError):
        return None  # no file: Hypercorn's defaults; a bad one was refused already
    return workers if isinstance(workers, int) and workers >= 1 else None


def _installed_plugins(settings: Settings) -> LoadedPlugins:
    """The team plugins the workers would mount (their migrations and datasets),
    loaded into a throwaway app; one that fails to import is named and left out."""
    from quart import Quart

    from ..config import split_list
    from ..plugins.loader import load_plugins

    plugins = load_plugins(
        Quart("quart_service.migrate"),
        split_list(settings.blueprints),
        {},
        set(split_list(settings.disabled_blueprints)),
        strict=False,
    )
    for name, error in plugins.skipped.items():
        click.echo(f"quart_service: team plugin {name!r} left out: {error}", err=True)
    return plugins


def _refuse_without_server_file(path: Path, *, given: bool) -> NoReturn:
    """Exit 2 with what to do: without its server file, serve would run on Hypercorn's
    defaults (one worker, a 3 s graceful timeout that cuts streams) and, from another
    folder, on a fresh ./data database. Say so instead of starting like that."""
    if given:
        click.echo(f"quart_service: the server config {path} does not exist", err=True)
    else:
        click.echo(
            f"quart_service: no {_SERVER_FILE} in {Path.cwd()}. serve reads the server "
            "settings (bind, workers, timeouts) from it, and the service keeps its data "
            "in ./data (QUART_SERVICE_DATA_DIR) relative to the current folder: run it "
            "from the service's folder, or pass --config PATH (an empty file for "
            "Hypercorn's own defaults: one worker, a 3 s graceful timeout).",
            err=True,
        )
    sys.exit(2)


def _settings_or_exit() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        click.echo(f"quart_service: bad settings: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
