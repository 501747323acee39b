"""Every metric the service exports, defined in one place.

One :class:`Metrics` is built per worker process when it starts serving (after
:func:`~quart_service.observability.metrics.store.enable_multiprocess` chose where
the values live), and each part of the service receives it when the part starts:
nothing reaches a process-global metrics object. Each value is written through to
this process's memory-mapped file (prometheus-client's multiprocess mode), so any
worker can sum every worker's values when ``/metrics`` is scraped.

Event counts go through :class:`~quart_service.observability.metrics.counts.Count`:
one call moves the Prometheus child and the per-process tally that
``/debug/identity`` shows, so the two cannot disagree.

Gauges state how they combine across workers: ``livesum`` adds the values of the
workers alive now (active streams, busy threads), ``liveall`` keeps one series per
worker (``pid`` label), ``max`` keeps the highest.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from .counts import Count, Counts, Observations

__all__ = ["Metrics"]

# Seconds: from a fast JSON answer to a long generation.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (*_LATENCY_BUCKETS, 120, 300, 600, 1800)


class Metrics:
    """The metric families of one process (see docs/operations.md for each meaning),
    and the samplers that set its gauges."""

    def __init__(self) -> None:
        # registry=None: these are collected from the files of every worker, never
        # from one process's registry (and a second app in a test process is fine).
        r = None
        self.requests = Counter(
            "quart_service_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "quart_service_http_request_duration_seconds",
            "Time from request start to the last byte of the response (streams included).",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_byte = Histogram(
            "quart_service_http_time_to_first_byte_seconds",
            "Time from request start to the first body byte of responses sent in pieces "
            "(a stream's first event: time to first token).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_progress = Gauge(
            "quart_service_http_requests_in_progress",
            "Requests being answered now, streams included (sampled).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.streams_active = Gauge(
            "quart_service_streams_active",
            "Streaming responses open now.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.streams_opened = Counter(
            "quart_service_streams_opened", "Streaming responses started.", registry=r
        )
        self.stream_ends = Counter(
            "quart_service_stream_ends",
            "Streams ended, by reason: completed, disconnected (the client left), "
            "idle_timeout, total_timeout, error, shutdown.",
            ["reason"],
            registry=r,
        )
        self.stream_events = Counter(
            "quart_service_stream_events", "Events (SSE events, NDJSON lines) sent.", registry=r
        )
        self.stream_writes = Counter(
            "quart_service_stream_writes",
            "Socket writes of streams; events / writes is the coalescing factor.",
            registry=r,
        )
        self.stream_heartbeats = Counter(
            "quart_service_stream_heartbeats",
            "Heartbeat comments sent on quiet streams.",
            registry=r,
        )
        self.executor_threads = Gauge(
            "quart_service_executor_threads",
            "Threads of the shared pools (sum over workers).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.executor_busy = Gauge(
            "quart_service_executor_busy",
            "Pool threads running a job now (sampled every second and at scrape).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.executor_queued = Gauge(
            "quart_service_executor_queued",
            "Jobs admitted and waiting for a pool thread (sampled).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.shed = Counter(
            "quart_service_shed_requests",
            "Work refused with 503 to protect the service: executor_full, resource_busy.",
            ["reason"],
            registry=r,
        )
        self.cache_requests = Counter(
            "quart_service_cache_requests",
            "Cache lookups by result (hit, miss).",
            ["result"],
            registry=r,
        )
        self.cache_loads = Counter(
            "quart_service_cache_loads",
            "Loader calls after misses, by outcome (ok, error); single flight keeps "
            "one per key per worker.",
            ["outcome"],
            registry=r,
        )
        self.database_queries = Counter(
            "quart_service_database_queries",
            "Database queries by purpose (poll, load, startup, read, write).",
            ["kind"],
            registry=r,
        )
        self.refresh_runs = Counter(
            "quart_service_refresh_runs",
            "Snapshots loaded and published by the leader (the data changed).",
            registry=r,
        )
        self.refresh_failures = Counter(
            "quart_service_refresh_failures",
            "Leader polls that failed to reach the database.",
            registry=r,
        )
        self.leader_changes = Counter(
            "quart_service_leader_changes",
            "Times a worker became the refresh leader.",
            registry=r,
        )
        self.is_leader = Gauge(
            "quart_service_leader",
            "1 in the worker that holds the leader lock (the sum should be 1 per host).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.snapshot_generation = Gauge(
            "quart_service_snapshot_generation",
            "Generation of the data snapshot each worker serves.",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.resource_state = Gauge(
            "quart_service_resource_state",
            "Workers whose resource is in each state (not_created, creating, ready, failed).",
            ["resource", "state"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.worker_threads = Gauge(
            "quart_service_worker_threads",
            "OS threads of each worker process (sampled).",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.worker_memory = Gauge(
            "quart_service_worker_resident_memory_bytes",
            "Resident memory of each worker process (sampled).",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.ai_tokens = Counter(
            "quart_service_ai_completion_tokens",
            "Completion tokens generated by the AI API.",
            registry=r,
        )
        # Request metrics are tallied here and moved at flush (see observe_request).
        self._answered: dict[tuple[str, str, int], Count] = {}
        self._durations: dict[str, Observations] = {}
        self._first_bytes: dict[str, Observations] = {}
        self._samplers: list[Callable[[Metrics], None]] = []

    # -- handles for the parts of the service ----------------------------------------

    def count(self, family: Counter, *labels: str) -> Count:
        """A :class:`Count` feeding ``family`` (its child for ``labels``)."""
        return Count(family.labels(*labels) if labels else family)

    def counts(self, family: Counter) -> Counts:
        """A :class:`Counts` feeding ``family``'s children, one per label value."""
        return Counts(family)

    def on_sample(self, sampler: Callable[[Metrics], None]) -> None:
        """Have ``sampler`` set its gauges at every :meth:`sample`."""
        self._samplers.append(sampler)

    def sample(self) -> None:
        """Set every sampled gauge now (every second, and before a scrape), and move
        the request tallies."""
        self.flush()
        for sampler in self._samplers:
            sampler(self)

    def observe_request(
        self, route: str, method: str, status: int, duration: float, first_byte: float | None
    ) -> None:
        """Record one answered request; the metrics move at :meth:`flush`.

        Written through, a request cost five locked writes to the shared files (its
        count, and a sum and a bucket for each histogram), about 10 µs of a worker's
        CPU per request. Tallied here, the service's clock moves them every 0.25 s and
        a scrape moves this worker's first (a ``SIGKILL``ed worker loses at most its
        last quarter second of request counts; a worker that stops flushes).
        """
        key = (route, method, status)
        count = self._answered.get(key)
        if count is None:
            count = self._answered[key] = self.count(self.requests, route, method, str(status))
        count.add()
        durations = self._durations.get(route)
        if durations is None:
            child = self.request_duration.labels(route)
            durations = self._durations[route] = Observations(child)
        durations.observe(duration)
        if first_byte is not None:
            first_bytes = self._first_bytes.get(route)
            if first_bytes is None:
                child = self.time_to_first_byte.labels(route)
                first_bytes = self._first_bytes[route] = Observations(child)
            first_bytes.observe(first_byte)

    def flush(self) -> None:
        """Move the request tallies to the shared metric files."""
        for count in self._answered.values():
            count.flush()
        for observations in (*self._durations.values(), *self._first_bytes.values()):
            observations.flush()
