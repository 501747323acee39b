"""What the Redis coordination costs Redis while idle, and the shared cache under a
cluster-wide miss. Each run starts its own ``redis-server`` (loopback, no persistence).

    python -m bench.redis_coordination [--seconds 10] [--keys 20]

1. Idle cost: N watchers (``SnapshotWatcher``, each on its own client, as each
   process would have), with and without a lease contender next to each (the
   leader renews, the others try to acquire, every TTL/3). N = 12 (3 hosts x 4
   workers, every worker subscribes) and N = 3 (one per host, relaying to the local
   file). After ``CONFIG RESETSTAT``, ``--seconds`` idle, then ``INFO commandstats``
   (calls per command, counting the calls a Lua script makes: a renewal is one
   EVALSHA, one GET and one PEXPIRE; the bench's own INFO/CONFIG left out) and
   ``INFO clients`` (connections, the bench's own left out). Then the delay from
   ``publish()`` until every one of N watchers has the generation (50 publications).
2. The shared cache: 3 processes (tests/support/redis_actor.py) each miss the same
   key with 50 concurrent requests at the same instant; loader calls per key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from quart_service.coordination.redis import (
    RedisLease,
    SnapshotStore,
    SnapshotWatcher,
    connect,
)
from tests.support.redis import running_redis
from tests.test_redis_coordination import actors

TTL = 10.0
FALLBACK = 5.0


async def _watch(watcher: SnapshotWatcher) -> None:
    async for _ in watcher:
        pass


async def _contend(lease: RedisLease) -> None:
    while True:
        if lease.held:
            await lease.renew()
        else:
            await lease.try_acquire()
        await asyncio.sleep(lease.renew_every)


async def idle_cost(url: str, watchers: int, leases: bool, seconds: float) -> dict[str, Any]:
    admin = connect(url)
    await admin.flushall()
    clients = [connect(url) for _ in range(watchers)]
    tasks: list[asyncio.Task[None]] = []
    for client in clients:
        tasks.append(asyncio.create_task(_watch(SnapshotWatcher(client, fallback_every=FALLBACK))))
        if leases:
            tasks.append(asyncio.create_task(_contend(RedisLease(client, ttl=TTL))))
    store = SnapshotStore(admin)
    await store.publish(await store.next_generation(), "{}")
    await asyncio.sleep(1.0)  # everyone subscribed and caught up
    await admin.config_resetstat()
    started = time.monotonic()
    await asyncio.sleep(seconds)
    stats = await admin.info("commandstats")
    elapsed = time.monotonic() - started
    clients_info = await admin.info("clients")
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for client in clients:
        await client.aclose()
    await admin.aclose()
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if not name.startswith(("cmdstat_info", "cmdstat_config"))
    }
    total = sum(calls.values())
    return {
        "watchers": watchers,
        "leases": leases,
        "connections": int(clients_info["connected_clients"]) - 1,  # not the bench's own
        "commands": total,
        "per_second": total / elapsed,
        "by_command": calls,
    }


async def delivery(url: str, watchers: int, publications: int) -> list[float]:
    """Seconds from publish() until every watcher has yielded that generation."""
    admin = connect(url)
    await admin.flushall()
    clients = [connect(url) for _ in range(watchers)]
    seen: list[dict[int, float]] = [{} for _ in range(watchers)]

    async def watch(index: int) -> None:
        async for generation in SnapshotWatcher(clients[index], fallback_every=FALLBACK):
            seen[index][generation] = time.perf_counter()

    tasks = [asyncio.create_task(watch(index)) for index in range(watchers)]
    store = SnapshotStore(admin)
    await asyncio.sleep(1.0)
    delays: list[float] = []
    for _ in range(publications):
        generation = await store.next_generation()
        sent = time.perf_counter()
        await store.publish(generation, "{}")
        while not all(generation in got for got in seen):
            await asyncio.sleep(0.0005)
        delays.append(max(got[generation] for got in seen) - sent)
        await asyncio.sleep(0.01)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for client in clients:
        await client.aclose()
    await admin.aclose()
    return delays


async def shared_cache(url: str, keys: int, flight: str) -> dict[str, Any]:
    loads: list[int] = []
    slowest: list[float] = []
    admin = connect(url)
    await admin.flushall()
    with actors(url, 3, ttl=TTL) as hosts:
        for index in range(keys):
            start = time.time() + 0.5
            for host in hosts:
                host.send(f"cache key-{index} 50 {start} {flight}")
            answers = [host._read() for host in hosts]
            loads.append(sum(int(answer["loads"]) for answer in answers))
            slowest.append(max(float(answer["seconds"]) for answer in answers))
    try:
        counted = [int(await admin.get(f"loads:key-{index}") or 0) for index in range(keys)]
    finally:
        await admin.aclose()
    return {"keys": keys, "loads_per_key": loads, "counted_in_redis": counted, "slowest": slowest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--keys", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, running_redis(Path(tmp)) as server:
        print(
            f"idle {args.seconds:.0f} s; fallback read every {FALLBACK:.0f} s; "
            f"lease TTL {TTL:.0f} s"
        )
        print("| watchers | lease contenders | connections | calls/s | calls in the window |")
        print("|---|---|---|---|---|")
        for watchers in (12, 3):
            for leases in (False, True):
                row = asyncio.run(idle_cost(server.url, watchers, leases, args.seconds))
                detail = ", ".join(f"{k} {v}" for k, v in sorted(row["by_command"].items()))
                print(
                    f"| {watchers} | {watchers if leases else 0} | {row['connections']} "
                    f"| {row['per_second']:.2f} | {detail} |"
                )
        for watchers in (12, 3):
            delays = sorted(asyncio.run(delivery(server.url, watchers, 50)))
            print(
                f"publish -> every one of {watchers} watchers (one process): "
                f"p50 {delays[len(delays) // 2] * 1000:.2f} ms, "
                f"p99 {delays[int(len(delays) * 0.99) - 1] * 1000:.2f} ms, "
                f"max {delays[-1] * 1000:.2f} ms"
            )
        for flight, label in (("", "per-process single flight"), ("shared", "single_flight=True")):
            cache = asyncio.run(shared_cache(server.url, args.keys, flight))
            per_key, slowest = cache["loads_per_key"], sorted(cache["slowest"])
            print(
                f"shared cache, {label}: 3 processes x 50 concurrent misses, "
                f"{cache['keys']} keys, loader 0.2 s: loader calls per key "
                f"min {min(per_key)} max {max(per_key)} "
                f"(counted in Redis: {sorted(set(cache['counted_in_redis']))}); "
                f"slowest request p50 {slowest[len(slowest) // 2] * 1000:.0f} ms, "
                f"max {slowest[-1] * 1000:.0f} ms"
            )


if __name__ == "__main__":
    main()
