"""``create_app``: builds the parts of the service and wires them; opens nothing.

Everything that opens a file, socket, thread or connection happens per worker process
when the parts start (:meth:`Service.start`), never here: Hypercorn spawns its workers
and each one imports the app (docs/design.md, pitfall 8).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from quart import Blueprint, Quart

from .api.admin import admin
from .api.docs_page import docs
from .api.openai import v1
from .api.openapi_doc import openapi
from .config import Settings, settings_sources, split_list, split_pairs
from .data.datasets import Dataset
from .data.layer import DataLayer
from .engines.host import EngineHost
from .errors import install_error_handlers
from .executor import Pool
from .native_threads import cap_native_threads
from .observability.observer import RequestObserver, mark_route
from .plugins.loader import import_string, load_plugins
from .plugins.wsgi import WSGIMounts
from .quart_app import ServiceQuart
from .routes.demo import demo
from .routes.health import health, identity
from .routes.scrape import scrape
from .service import Service
from .singletons import Resource, ResourceRegistry
from .streaming.body import StreamHub, StreamPolicy

__all__ = ["create_app"]


def create_app(
    settings: Settings | None = None,
    *,
    resources: Sequence[Resource[Any]] = (),
    blueprints: Iterable[Blueprint] = (),
    datasets: Sequence[Dataset[Any]] = (),
) -> Quart:
    """Build the Quart app: settings (from the environment by default), the built-in
    routes, ``blueprints``, this process's ``resources`` and the ``datasets`` they
    read, declared (nothing is created or loaded here)."""
    sources = settings_sources() if settings is None else ["create_app(settings)"]
    settings = Settings.from_env() if settings is None else settings
    # First, before team plugins are imported below and before any engine or resource
    # loads a model library: the native thread caps must be in the environment when a
    # library loads (OpenBLAS starts its threads then). Under the hypercorn command
    # this is the first code of ours a worker runs; quart-service serve applied them
    # earlier, before the app module was imported (see quart_service.native_threads).
    native = cap_native_threads(settings.native_threads)
    app = ServiceQuart("quart_service", static_folder=None)
    app.config.update(
        RESPONSE_TIMEOUT=settings.response_timeout or None,
        MAX_CONTENT_LENGTH=settings.max_body_size,
    )
    # Keep the order a view wrote its keys in, and skip the sort on every response.
    app.json.sort_keys = False  # type: ignore[attr-defined]

    app.request_steps.append(mark_route)
    app.register_blueprint(health)
    if settings.metrics:
        app.register_blueprint(scrape)
    app.register_blueprint(v1)
    app.register_blueprint(openapi)
    app.register_blueprint(docs)
    if settings.admin_token:
        app.register_blueprint(admin)
    if settings.identity_endpoint:
        app.register_blueprint(identity)
    if settings.demo_routes:
        app.register_blueprint(demo)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    # Team blueprints last, so a route that collides with any of the above is refused.
    plugins = load_plugins(
        app,
        split_list(settings.blueprints),
        split_pairs(settings.blueprint_prefixes),
        set(split_list(settings.disabled_blueprints)),
        strict=settings.plugin_failure == "fail",
    )

    # The parts of each worker, in start order (stopped in reverse).
    pool = Pool(settings)
    registry = ResourceRegistry(
        max_waiting=settings.executor_queue,
        warm_all=settings.warm_resources,
        retry_after=settings.retry_after,
    )
    streams = StreamHub(StreamPolicy.from_settings(settings), pool, settings.stream_reconnect_after)
    data = DataLayer(
        settings,
        registry,
        [*plugins.datasets, *datasets],
        migrations=plugins.migration_sources(),
        dataset_owners=plugins.dataset_owners,
        # skip: a team whose migrations fail is skipped; fail: the worker does not start.
        on_source_failure=plugins.fail if settings.plugin_failure == "skip" else None,
    )
    engines = EngineHost(registry, pool, native.threads)
    for spec in [*plugins.resources, *resources]:
        registry.declare(spec)
    app.request_steps.append(plugins.gate)
    install_error_handlers(app)

    if settings.wsgi_mounts:
        mounts = WSGIMounts(app.asgi_app, settings.wsgi_max_body_size)
        for prefix, target in split_pairs(settings.wsgi_mounts).items():
            mounts.mount(prefix, import_string(target))
        app.asgi_app = mounts  # type: ignore[method-assign]
    if settings.cors_allow_origins:
        _enable_cors(app, split_list(settings.cors_allow_origins))

    # The registry starts after the parts its resources need (the snapshot needs the
    # data layer), so warming and the required resources find them ready.
    service = Service(
        settings,
        [pool, streams, data, engines, plugins, registry],
        streams,
        native=native,
        sources=sources,
        mounts=[f"{p}={t}" for p, t in split_pairs(settings.wsgi_mounts).items()],
    )
    # Outermost: ids, access log and metrics see what the client sees.
    observer = RequestObserver(app.asgi_app, settings, lambda: service.drain.draining)
    service.observer = observer
    app.asgi_app = observer  # type: ignore[method-assign]
    service.install(app)
    return app


def _enable_cors(app: Quart, origins: list[str]) -> None:
    """Browser access for the listed origins (quart-cors); off unless configured."""
    from quart_cors import cors

    cors(
        app,
        allow_origin="*" if origins == ["*"] else origins,
        allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        allow_methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
        expose_headers=["X-Request-ID", "Retry-After"],
        max_age=600,
    )
