"""Request metrics tallied in the worker and moved at a flush equal what
prometheus-client's own ``observe``/``inc`` would have recorded."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from quart_service.observability.metrics.counts import Observations

_BUCKETS = (0.001, 0.01, 0.1, 1, 10)


def _buckets(histogram: Histogram) -> dict[str, float]:
    return {
        f"{sample.name}{sample.labels.get('le', '')}": sample.value
        for family in histogram.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_observations_move_to_the_histogram_only_at_flush_and_equal_direct_observes() -> None:
    registry = CollectorRegistry()
    direct = Histogram("direct_seconds", "d", ["route"], buckets=_BUCKETS, registry=registry)
    tallied = Histogram("tallied_seconds", "t", ["route"], buckets=_BUCKETS, registry=registry)
    observations = Observations(tallied.labels("/x"))
    rng = random.Random(7)
    # Values on the bounds too: an observation equal to a bound falls in that bucket.
    values = [rng.choice([0.0, *_BUCKETS, 100.0]) for _ in range(50)]
    values += [rng.uniform(0, 20) for _ in range(500)]

    for value in values:
        direct.labels("/x").observe(value)
        observations.observe(value)
    before = _buckets(tallied)
    assert before["tallied_seconds_count"] == 0, "nothing moves before the flush"

    observations.flush()
    observations.flush()  # a second flush with nothing new adds nothing
    theirs = {key.replace("direct", "tallied"): v for key, v in _buckets(direct).items()}
    ours = _buckets(tallied)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert abs(ours[key] - value) < 1e-9, key
    assert ours["tallied_seconds_count"] == len(values)

    observations.observe(0.5)
    observations.flush()
    assert _buckets(tallied)["tallied_seconds_count"] == len(values) + 1
