"""``python -m bench.streams`` against a real server (2 Hypercorn workers): its load
generator counts every event of every paced stream exactly once, whatever the framing
(chunked encoding, events coalesced into one write), so the numbers it prints stand on
complete streams. No timing is asserted: the bench reports latencies, CI does not judge
them."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.streams import STACKS, measure, running

pytestmark = pytest.mark.slow


def test_every_event_of_every_stream_is_counted(tmp_path: Path) -> None:
    with running(STACKS["service-hypercorn"], tmp_path) as server:
        sample = measure(server, streams=20, rate=50, seconds=1.0, stagger=0.2, clients=2)
        assert server.process.poll() is None
    assert (sample.completed, sample.failed) == (20, 0)
    assert sample.client_per_10k > 0
