"""A separate process (a "host") driving the Redis primitives, for multi-process tests.

``python -m tests.support.redis_actor URL [TTL]`` reads one command per line on stdin
and answers one JSON line on stdout:

* ``acquire`` / ``renew`` / ``release`` / ``held`` — its :class:`RedisLease`;
* ``keep`` — start renewing in the background (``RedisLease.keep``);
* ``next`` — ``SnapshotStore.next_generation()``;
* ``publish G TEXT`` / ``publish_leased G TEXT`` — ``SnapshotStore.publish``;
* ``contend SECONDS START`` — from wall-clock time START, for SECONDS: renew when
  holding (every ``renew_every``), else try to acquire every 20 ms; answers how many
  times it acquired and for how long it held;
* ``cache KEY REQUESTS START [shared]`` — at START, REQUESTS concurrent
  ``get_or_load(KEY)`` on a ``ServiceCache`` over the shared Redis (``shared``: with
  the cross-process single flight); the loader sleeps 0.2 s and counts itself in
  Redis (``INCR loads:KEY``); answers this process's loads and how long the slowest
  request took.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from quart_service import ServiceCache
from quart_service.coordination.redis import RedisLease, SnapshotStore, connect
from quart_service.coordination.redis_cache import RedisCacheBackend


async def _until(start: float) -> None:
    await asyncio.sleep(max(0.0, start - time.time()))


async def main(url: str, ttl: float) -> None:
    client = connect(url)
    lease = RedisLease(client, ttl=ttl)
    store = SnapshotStore(client)
    keeper: asyncio.Task[None] | None = None
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True, "token": lease.token}), flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command, *args = line.split(maxsplit=2)
        answer: dict[str, Any]
        if command == "acquire":
            answer = {"ok": await lease.try_acquire()}
        elif command == "renew":
            answer = {"ok": await lease.renew()}
        elif command == "release":
            answer = {"ok": await lease.release()}
        elif command == "held":
            answer = {"ok": lease.held}
        elif command == "keep":
            keeper = asyncio.create_task(lease.keep())
            answer = {"ok": True}
        elif command == "next":
            answer = {"generation": await store.next_generation()}
        elif command in ("publish", "publish_leased"):
            leased = lease if command == "publish_leased" else None
            answer = {"ok": await store.publish(int(args[0]), args[1], lease=leased)}
        elif command == "contend":
            answer = await _contend(lease, float(args[0]), float(args[1]))
        elif command == "cache":
            key, rest = args[0], args[1].split()
            shared = rest[2:] == ["shared"]
            answer = await _cache(client, key, int(rest[0]), float(rest[1]), shared)
        else:
            answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), flush=True)
    if keeper is not None:
        keeper.cancel()
    await client.aclose()


async def _contend(lease: RedisLease, seconds: float, start: float) -> dict[str, Any]:
    await _until(start)
    acquired, held_for = 0, 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if lease.held:
            began = time.monotonic()
            await asyncio.sleep(lease.renew_every)
            held_for += time.monotonic() - began
            await lease.renew()
        elif await lease.try_acquire():
            acquired += 1
        else:
            await asyncio.sleep(0.02)
    return {"acquired": acquired, "held_for": held_for, "held_at_end": lease.held}


async def _cache(
    client: Any, key: str, requests: int, start: float, shared: bool
) -> dict[str, Any]:
    backend = RedisCacheBackend(client, single_flight=shared)
    cache = ServiceCache(60.0, lambda: "s1", backend=backend)

    async def loader() -> str:
        await asyncio.sleep(0.2)
        await client.incr(f"loads:{key}")
        return f"value of {key}"

    await _until(start)
    began = time.monotonic()
    values = await asyncio.gather(*[cache.get_or_load(key, loader) for _ in range(requests)])
    return {
        "loads": cache.loads.as_dict().get("ok", 0),
        "values": sorted(set(values)),
        "seconds": time.monotonic() - began,
    }


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 10.0))
