"""5,000 idle SSE streams held on one host (2 workers): heartbeats reach every one of
them and the service stays responsive. Memory per stream is reported by
``python -m bench.idle_streams`` (docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.idle_streams import HEARTBEAT, measure
from tests.support.server import running_server

pytestmark = pytest.mark.slow

STREAMS = 5000


async def test_five_thousand_idle_streams_all_get_heartbeats_and_livez_stays_fast(
    tmp_path: Path,
) -> None:
    env = {
        "QUART_SERVICE_STREAM_HEARTBEAT": str(HEARTBEAT),
        "QUART_SERVICE_STREAM_IDLE_TIMEOUT": "0",
        "QUART_SERVICE_ACCESS_LOG": "0",
    }
    with running_server(tmp_path, app="bench.apps:service", env=env) as server:
        result = await measure(server, "/livez", STREAMS, hold=0, probes=60)
        assert server.process.poll() is None
        assert len(server.worker_pids()) == 2
    assert result["first_event"] == STREAMS
    assert result["heartbeats"] == STREAMS
    assert result["probe_p99_ms"] < 50, result
    # Kept small: tens of KiB per held stream, Hypercorn's connection included.
    assert result["kib_per_stream"] < 100, result
