"""``GET /metrics``: Prometheus text, summed over every worker of this server.

Whichever worker answers reads the metric files of all of them (prometheus-client's
multiprocess mode), so every scrape sees the whole server, not one worker.
Host-wide facts that live in files the leader writes (how old the data is) are
added here, where they are read, instead of being copied by every worker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily, Metric
from quart import Blueprint, Response

from ..context import data
from ..data.plane import Freshness
from ..errors import ResourceUnavailable
from ..observability.metrics import metrics_directory, render
from ..part import current_metrics

__all__ = ["scrape"]

scrape = Blueprint("scrape", __name__)


class _HostCollector:
    """Snapshot freshness as the leader last recorded it (refresh.json)."""

    def __init__(self, freshness: Freshness) -> None:
        self.freshness = freshness

    def collect(self) -> Iterator[Metric]:
        freshness = self.freshness
        published = GaugeMetricFamily(
            "quart_service_snapshot_published_generation",
            "Generation of the snapshot the leader published last.",
        )
        published.add_metric([], float(freshness.data.get("generation", 0) or 0))
        yield published
        if freshness.checked_at is not None:
            age = GaugeMetricFamily(
                "quart_service_snapshot_age_seconds",
                "Seconds since the leader last reached the database: how stale the "
                "served data may be.",
            )
            age.add_metric([], max(0.0, time.time() - freshness.checked_at))
            yield age
        failing = GaugeMetricFamily(
            "quart_service_refresh_failing",
            "1 while the leader cannot reach the database (workers serve the last snapshot).",
        )
        failing.add_metric([], 1.0 if freshness.failing_since is not None else 0.0)
        yield failing


@scrape.get("/metrics")
async def metrics_text() -> Response:
    """Every worker's metrics, summed; this worker's gauges sampled just now."""
    directory = metrics_directory()
    metrics = current_metrics()
    if directory is None or metrics is None:
        raise ResourceUnavailable("metrics are not enabled in this process")
    metrics.sample()
    body = render(directory, [_HostCollector(data().freshness())])
    return Response(body, content_type=CONTENT_TYPE_LATEST)
