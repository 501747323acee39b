"""Time to first token and token rates of the built-in local engine, streamed.

    python -m bench.ttft [--tokens 200] [--levels 1,16,256]

For each concurrency level, that many clients stream a chat completion of ``--tokens``
tokens at once from the shipped setup (2 uvloop workers, model ``local-ngram``,
unpaced). Prints time to first token p50/p99, tokens/s per stream (median) and in
aggregate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from statistics import median, quantiles

import httpx

from tests.support.server import running_server


async def _one(client: httpx.AsyncClient, tokens: int, seed: int) -> tuple[float, float, int]:
    body = {
        "model": "local-ngram",
        "messages": [{"role": "user", "content": "We hold these truths"}],
        "max_tokens": tokens,
        "seed": seed,
        "stream": True,
    }
    started = time.monotonic()
    first = 0.0
    count = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                count += 1
                if count == 1:
                    first = time.monotonic() - started
    return first, time.monotonic() - started, count


async def _level(url: str, streams: int, tokens: int) -> None:
    limits = httpx.Limits(max_connections=streams)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        await _one(client, 5, 0)  # warm: builds the engine in the worker
        started = time.monotonic()
        results = await asyncio.gather(*(_one(client, tokens, i) for i in range(streams)))
        wall = time.monotonic() - started
    firsts = [r[0] for r in results]
    rates = [r[2] / r[1] for r in results]
    total = sum(r[2] for r in results)
    short = sum(1 for r in results if r[2] != tokens)
    p99 = quantiles(firsts, n=100, method="inclusive")[98] if len(firsts) > 1 else firsts[0]
    print(
        f"{streams:8d} {median(firsts) * 1000:10.1f} {p99 * 1000:10.1f} "
        f"{median(rates):14.0f} {total / wall:16.0f} {short:6d}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--levels", default="1,16,256")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        env = {"QUART_SERVICE_DATA_DIR": str(Path(tmp) / "data")}
        with running_server(Path(tmp), workers=2, env=env) as server:
            print(f"local-ngram, {args.tokens} tokens per stream, 2 workers")
            print(f"{'streams':>8} {'TTFT p50':>10} {'TTFT p99':>10} {'tok/s/stream':>14} "
                  f"{'tok/s total':>16} {'short':>6}")  # fmt: skip
            print(f"{'':8} {'(ms)':>10} {'(ms)':>10}")
            for streams in levels:
                asyncio.run(_level(server.url, streams, args.tokens))


if __name__ == "__main__":
    main()
