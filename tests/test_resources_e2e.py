"""Per-process singletons under a real Hypercorn with 4 worker processes."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest

from .conftest import read_events
from .support.server import running_server


async def _burst(url: str, count: int) -> list[dict[str, object]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        responses = await asyncio.gather(*(client.get(url) for _ in range(count)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses[:3]]
    return [r.json() for r in responses]


@pytest.mark.slow
def test_slow_resource_is_created_once_per_worker_under_a_burst(tmp_path: Path) -> None:
    events_file = tmp_path / "events.jsonl"
    env = {"TEST_EVENTS_FILE": str(events_file), "TEST_SLOW_CREATE_SECONDS": "1"}
    with running_server(tmp_path, workers=4, env=env) as server:
        answers = asyncio.run(_burst(server.url + "/slow", 200))
        # Make sure every worker has served the route at least once.
        for _ in range(400):
            if len({a["pid"] for a in answers}) == 4:
                break
            answers.append(httpx.get(server.url + "/slow", timeout=10).json())
        worker_pids = set(server.worker_pids())

    ids_by_pid: dict[object, set[object]] = defaultdict(set)
    for answer in answers:
        ids_by_pid[answer["pid"]].add(answer["instance_id"])
    assert set(ids_by_pid) == worker_pids
    # One instance per worker, and every worker's instance is its own.
    assert all(len(ids) == 1 for ids in ids_by_pid.values())
    assert len({next(iter(ids)) for ids in ids_by_pid.values()}) == 4
    # The factory ran exactly once in each worker, even under 200 first requests.
    created = Counter(e["pid"] for e in read_events(events_file) if e["resource"] == "slow")
    assert created == Counter(dict.fromkeys(worker_pids, 1))
