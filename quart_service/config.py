"""The service's settings: one frozen, typed, picklable object.

Sources, later ones winning:

1. the defaults written below (with their units);
2. a TOML file, named by ``QUART_SERVICE_CONFIG`` (flat keys, the field names);
3. environment variables ``QUART_SERVICE_<FIELD>`` (upper case).

An unknown key (in the file or as a ``QUART_SERVICE_`` variable) and a value of the
wrong type or out of range stop start-up with a :class:`SettingsError` that names the
key and what it expected. Hypercorn silently accepts a misspelled key; we do not.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, get_type_hints

from .errors import SettingsError

__all__ = [
    "BYTES",
    "CONFIG_ENV",
    "ENV_PREFIX",
    "KIB",
    "MIB",
    "MILLISECONDS",
    "SECONDS",
    "WORKLOADS",
    "Settings",
    "settings_sources",
    "split_list",
    "split_pairs",
]

ENV_PREFIX: Final = "QUART_SERVICE_"
CONFIG_ENV: Final = ENV_PREFIX + "CONFIG"

# Units, so that defaults read as what they mean (``30 * SECONDS``).
SECONDS: Final = 1.0
MILLISECONDS: Final = SECONDS / 1000
BYTES: Final = 1
KIB: Final = 1024 * BYTES
MIB: Final = 1024 * KIB
# The workload hints of the default sizes (quart_service.sizing has the rule).
WORKLOADS: Final = ("mixed", "io", "cpu", "native")
_SECRETS = frozenset({"admin_token", "api_keys", "database_url"})  # a URL may hold a password
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _bad(key: str, problem: str) -> SettingsError:
    """A bad value of one setting; ``param`` keeps the key, so that a constructor that
    knows where the value came from can say so (the settings file, the variable)."""
    return SettingsError(f"setting {key!r}: {problem}", param=key)


def _setting(default: Any, doc: str, *, minimum: float | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "minimum": minimum})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the service. Build it with :meth:`from_env`, :meth:`from_toml`
    or :meth:`from_mapping`; it is immutable and picklable (spawned workers get it)."""

    executor_threads: int = _setting(
        0,
        "Threads in the one shared pool of each worker process; 0: as the workload "
        "setting says (docs/process-model.md, 'Choosing workers and threads').",
        minimum=0,
    )
    workload: str = _setting(
        "mixed",
        "What the pool carries, for the default sizes: io (blocking waits: 32 threads), "
        "cpu (Python holding the GIL: 2), native (code releasing the GIL: native budget "
        "+ 1) or mixed (16). quart-service serve runs one worker per CPU.",
    )
    executor_queue: int = _setting(
        64,
        "Jobs that may wait for a pool thread; beyond that, requests get 503.",
        minimum=0,
    )
    native_threads: int = _setting(
        0,
        "Threads each worker's native libraries may use (OpenBLAS, OpenMP, MKL; engines "
        "size onnxruntime or PyTorch pools by it). 0: the CPUs this process may use "
        "(affinity, cgroup quota) divided by the workers, at least 1; -1: no caps.",
        minimum=-1,
    )
    retry_after: float = _setting(
        1 * SECONDS, "Seconds sent in Retry-After when a request is shed.", minimum=0
    )
    response_timeout: float = _setting(
        60 * SECONDS,
        "Deadline for a whole non-streaming response (Quart's RESPONSE_TIMEOUT); "
        "streams are exempt and use the stream_* timeouts.",
        minimum=0,
    )
    max_body_size: int = _setting(
        16 * MIB, "Largest request body accepted, in bytes (413 beyond).", minimum=0
    )
    max_url_length: int = _setting(
        8 * KIB, "Longest path plus query string accepted, in bytes (414 beyond).", minimum=1
    )
    max_header_size: int = _setting(
        16 * KIB,
        "Largest total of request header names and values, in bytes (431 beyond).",
        minimum=1,
    )
    stream_idle_timeout: float = _setting(
        60 * SECONDS,
        "A stream whose producer is silent this long ends with a stream_idle_timeout error event.",
        minimum=0,
    )
    stream_total_timeout: float = _setting(
        0 * SECONDS,
        "Longest life of one stream; 0 means no limit. Ends with a stream_total_timeout "
        "error event.",
        minimum=0,
    )
    stream_heartbeat: float = _setting(
        15 * SECONDS,
        "An SSE comment is sent after this long without an event, so proxies keep the "
        "connection; 0 turns heartbeats off.",
        minimum=0,
    )
    stream_buffer_bytes: int = _setting(
        64 * KIB,
        "Bytes a stream may hold for a slow client; the producer waits beyond that.",
        minimum=1,
    )
    stream_drain_timeout: float = _setting(
        25 * SECONDS,
        "After SIGTERM, how long a worker lets open streams run before it exits. Keep "
        "hypercorn.toml's graceful_timeout a little above it.",
        minimum=0,
    )
    data_dir: str = _setting(
        "data", "Folder for the database, locks and the published snapshot; created."
    )
    database_path: str = _setting(
        "", "SQLite database file; empty means <data_dir>/quart_service.db."
    )
    database_busy_timeout: float = _setting(
        5 * SECONDS, "How long a query waits for a lock held by another writer.", minimum=0
    )
    database_url: str = _setting(
        "",
        "postgresql://user:password@host:5432/db to use PostgreSQL (asyncpg); empty means "
        "the SQLite file (database_path).",
    )
    database_pool_size: int = _setting(
        4, "Most PostgreSQL connections a worker opens (its asyncpg pool's max).", minimum=1
    )
    auto_migrate: bool = _setting(
        True, "Workers apply pending migrations at start-up (one of them, under a lock)."
    )
    refresh_interval: float = _setting(
        2 * SECONDS,
        "How often the leader checks the database's change marker.",
        minimum=0.05,
    )
    snapshot_max_staleness: float = _setting(
        60 * SECONDS,
        "/readyz answers 503 when the last good refresh is older than this; 0: never.",
        minimum=0,
    )
    coordination_url: str = _setting(
        "",
        "Redis URL for several hosts: one refresh leader per cluster, change notices; "
        "empty: this host only (a file lock).",
    )
    coordination_prefix: str = _setting(
        "quart_service", "Prefix of every Redis key and channel (deployments may share one)."
    )
    leader_lease_ttl: float = _setting(
        5 * SECONDS,
        "How long the cluster leader's Redis lease lasts unrenewed (renewed every third).",
        minimum=0.5,
    )
    cache_backend: str = _setting(
        "memory",
        "Where get_or_load keeps values: memory (per worker) or redis (shared by every "
        "worker of every host; at cache_url, else coordination_url).",
    )
    cache_url: str = _setting("", "Redis URL of the shared cache (empty: coordination_url).")
    cache_ttl: float = _setting(300 * SECONDS, "Default lifetime of a cached value.", minimum=0)
    admin_token: str = _setting(
        "", "Bearer token of the /admin API; empty turns the admin API off."
    )
    api_keys: str = _setting(
        "",
        "API keys of /v1, comma-separated: each call then needs 'Authorization: Bearer "
        "<key>' (401 otherwise); empty: /v1 is open. Health and metrics never need one.",
    )
    blueprints: str = _setting(
        "", "Extra team blueprints as comma-separated module:attribute import strings."
    )
    blueprint_prefixes: str = _setting(
        "", "URL prefix per team blueprint: name=/prefix, comma-separated."
    )
    disabled_blueprints: str = _setting("", "Team blueprints not to mount, comma-separated.")
    plugin_failure: str = _setting(
        "skip", "A team blueprint that fails to load: skip (and report it) or fail."
    )
    wsgi_mounts: str = _setting(
        "", "WSGI (Flask) apps to mount: /prefix=module:attribute, comma-separated."
    )
    wsgi_max_body_size: int = _setting(
        16 * MIB, "Largest request body for a mounted WSGI app, in bytes (413 beyond).", minimum=0
    )
    warm_resources: bool = _setting(
        False, "Create every declared resource at start-up instead of on first use."
    )
    identity_endpoint: bool = _setting(
        False, "Serve GET /debug/identity (pid, role, resources, threads) for operators."
    )
    demo_routes: bool = _setting(True, "Serve the example stream at GET /demo/stream.")
    stream_reconnect_after: int = _setting(
        1000,
        "Milliseconds sent as SSE retry: in the shutdown event that ends a stream at "
        "the drain deadline; the client reconnects (to another worker) after it.",
        minimum=0,
    )
    metrics: bool = _setting(
        True, "Serve GET /metrics, summed over every worker of the server (Prometheus text)."
    )
    metrics_dir: str = _setting(
        "",
        "Folder of the workers' metric files; empty means <data_dir>/metrics. One "
        "sub-folder per running server; those of dead servers are removed.",
    )
    log_format: str = _setting("text", "Log lines as text or json (one object per line).")
    access_log: bool = _setting(
        True, "One log line per request: method, path, status, duration, bytes, request id."
    )
    cors_allow_origins: str = _setting(
        "",
        "Origins allowed to call the API from a browser, comma-separated (* for any); "
        "empty turns CORS off.",
    )
    log_level: str = _setting("INFO", "Level of the service's own loggers.")

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = hints[f.name]
            # bool is an int in Python; never let True pass as a thread count.
            wrong_bool = expected is not bool and isinstance(value, bool)
            if not isinstance(value, expected) or wrong_bool:
                if expected is float and isinstance(value, int) and not isinstance(value, bool):
                    object.__setattr__(self, f.name, float(value))
                    value = float(value)
                else:
                    raise _bad(
                        f.name,
                        f"expected {_type_name(expected)}, got {value!r} ({type(value).__name__})",
                    )
            minimum = f.metadata.get("minimum")
            if minimum is not None and value < minimum:
                raise _bad(f.name, f"must be >= {minimum}, got {value!r}")
        if self.cache_backend not in {"memory", "redis"}:
            raise _bad("cache_backend", f"expected 'memory' or 'redis', got {self.cache_backend!r}")
        if self.cache_backend == "redis" and not (self.cache_url or self.coordination_url):
            raise _bad("cache_backend", "'redis' needs cache_url (or coordination_url)")
        if self.workload not in WORKLOADS:
            raise _bad("workload", f"expected one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        if self.plugin_failure not in {"skip", "fail"}:
            raise _bad("plugin_failure", f"expected 'skip' or 'fail', got {self.plugin_failure!r}")
        for key in ("blueprint_prefixes", "wsgi_mounts"):
            for item in split_list(getattr(self, key)):
                if "=" not in item:
                    raise _bad(key, f"expected name=value pairs, got {item!r}")
        if self.database_url and not self.database_url.startswith(_POSTGRES_SCHEMES):
            raise _bad(
                "database_url",
                "expected postgresql://... (or empty for the SQLite file), got a URL "
                f"starting {self.database_url.split(':')[0]!r}",
            )
        if self.log_format not in {"text", "json"}:
            raise _bad("log_format", f"expected 'text' or 'json', got {self.log_format!r}")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise _bad(
                "log_level",
                f"expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {self.log_level!r}",
            )

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "mapping") -> Settings:
        """Settings from native Python values; unknown keys are refused."""
        return cls._build(values, lambda _key: source)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Settings:
        """Settings from a TOML file of flat ``key = value`` lines."""
        return cls.from_mapping(_read_toml(Path(path)), source=f"the settings file {path}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``QUART_SERVICE_*`` variables over the optional TOML file.

        A bad key or value is named with where it came from: the settings file (its
        path) or the environment variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        if env.get(CONFIG_ENV):
            path = env[CONFIG_ENV]
            from_file = _read_toml(Path(path))
            values.update(from_file)
            origins.update(dict.fromkeys(from_file, f"the settings file {path} ({CONFIG_ENV})"))
        hints = get_type_hints(cls)
        for name, raw in env.items():
            if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
                continue
            key = name[len(ENV_PREFIX) :].lower()
            if key not in hints:
                raise SettingsError(
                    f"unknown setting {name} (an environment variable); known settings: "
                    + ", ".join(ENV_PREFIX + k.upper() for k in sorted(hints))
                )
            values[key] = _cast(name, raw, hints[key])
            origins[key] = f"the environment variable {name}"
        return cls._build(values, lambda key: origins.get(key, "the defaults"))

    @classmethod
    def _build(cls, values: Mapping[str, Any], origin: Callable[[str], str]) -> Settings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(
                f"unknown setting {unknown[0]!r} in {origin(unknown[0])}; known settings: "
                + ", ".join(sorted(known))
            )
        try:
            return cls(**values)
        except SettingsError as exc:
            if exc.param is None:
                raise
            raise SettingsError(f"{exc} (from {origin(exc.param)})", param=exc.param) from None

    @property
    def database_file(self) -> Path:
        """The SQLite file: ``database_path``, or its default inside ``data_dir``."""
        return Path(self.database_path or Path(self.data_dir) / "quart_service.db")

    @property
    def database_target(self) -> Path | str:
        """What the data layer connects to: the ``database_url`` (PostgreSQL) when set,
        else the SQLite file."""
        return self.database_url or self.database_file

    @property
    def metrics_root(self) -> Path:
        """The folder of the metric files (``metrics_dir`` or ``<data_dir>/metrics``)."""
        return Path(self.metrics_dir) if self.metrics_dir else Path(self.data_dir) / "metrics"

    def describe(self) -> list[tuple[str, str, Any, str]]:
        """(name, type, value, doc) of every setting, for ``quart-service check``;
        secrets are masked."""
        hints = get_type_hints(type(self))
        return [
            (
                f.name,
                _type_name(hints[f.name]),
                "***" if f.name in _SECRETS and getattr(self, f.name) else getattr(self, f.name),
                f.metadata["doc"],
            )
            for f in dataclasses.fields(self)
        ]


def settings_sources(environ: Mapping[str, str] | None = None) -> list[str]:
    """Where :meth:`Settings.from_env` takes its values from, for start-up logs: the
    settings file (absolute path) and the ``QUART_SERVICE_*`` variables set (names
    only: values may be secrets); ``["the defaults"]`` when neither."""
    env = os.environ if environ is None else environ
    sources = []
    if env.get(CONFIG_ENV):
        sources.append(f"file {Path(env[CONFIG_ENV]).resolve()} ({CONFIG_ENV})")
    names = sorted(n for n in env if n.startswith(ENV_PREFIX) and n != CONFIG_ENV)
    if names:
        sources.append("environment " + ", ".join(names))
    return sources or ["the defaults"]


def split_list(value: str) -> list[str]:
    """A comma-separated setting as a list, blanks dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def split_pairs(value: str) -> dict[str, str]:
    """A comma-separated ``key=value`` setting as a dict."""
    return dict(item.split("=", 1) for item in split_list(value))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"cannot read the settings file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"the settings file {path} is not valid TOML: {exc}") from exc


def _cast(name: str, raw: str, expected: type) -> Any:
    text = raw.strip()
    try:
        if expected is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(text)
        if expected is int:
            return int(text.replace("_", ""))
        if expected is float:
            return float(text)
    except ValueError:
        raise SettingsError(f"{name}: expected {_type_name(expected)}, got {raw!r}") from None
    return raw


def _type_name(expected: type) -> str:
    return {
        bool: "a boolean (true/false)",
        int: "an integer",
        float: "a number",
        str: "a string",
    }.get(expected, expected.__name__)
