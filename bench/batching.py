"""Batched against unbatched decoding and embedding, on the same engine and weights.

    python -m bench.batching [--streams 1,8,32,128] [--tokens 32] [--layers 6 --embd 384]
                             [--workers 1] [--rounds 1] [--models batched,alone]

Writes a random GPT-2 of that shape (6 x 384: about 43 MB of float32, a byte-level
vocabulary) and starts the service under Hypercorn with ``--workers`` workers (one by
default, so every stream of a run shares one worker's batch). Two model rows point at
the same file: ``batched`` (``max_batch`` 128, ``embed_batch`` 64) and ``alone``
(``max_batch`` 0 and ``embed_batch`` 0: every stream steps by itself, one pool job
per token, and every request embeds by itself).

For each number of concurrent streams, each model: that many streamed completions at
once (``--tokens`` tokens each, temperature 0, a different prompt each; with
``--steady S``, that many clients that each open a new stream as soon as the last one
ended, for S seconds, so streams join a batch already running; those clients run in
processes of at most ``--streams-per-client`` streams each, 8 by default), and

- aggregate tokens/s: tokens received by all clients / wall time of the run;
- worker CPU per token (/proc, user + system, all workers);
- time to first token per stream (request sent to its first text chunk), p50 / p99;
- the batcher's mean batch size (the worker's ``/debug/identity``);
- the load generator's own CPU per token (this process and its client processes).

Then embeddings: 64 concurrent requests of one text each, 5 times, per model:
requests/s, worker CPU per request, mean texts per job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import median
from typing import Any

import httpx

from quart_service.engines.neural.random_weights import write_random_weights
from quart_service.engines.neural.weights import GPT2Config
from tests.support.data import wait_all
from tests.support.server import pinned_workers, running_server

from .compare import cpu_seconds as _cpu_of
from .shared_weights import TOKEN, put_model

MODELS = {
    "batched": {"max_batch": 128, "embed_batch": 64},
    "alone": {"max_batch": 0, "embed_batch": 0},
}
EMBED_REQUESTS = 64
EMBED_ROUNDS = 5


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids``, summed."""
    return sum(_cpu_of(pid) for pid in pids)


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * p) - 1)]


async def _one_stream(
    client: httpx.AsyncClient, model: str, n: int, tokens: int
) -> tuple[int, float]:
    """Tokens generated (the usage the stream ends with) and the time to the first
    token's chunk."""
    body = {
        "model": model,
        "prompt": f"Stream {n} of the bench: we the people",
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = math.nan
    generated = chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if not line.startswith('data: {"id"'):
                continue
            chunks += 1
            if '"usage"' in line:
                generated = json.loads(line[6:])["usage"]["completion_tokens"]
            elif chunks == 2:
                # The first chunk is the answer's head; the second carries the first
                # token (its text may be empty: a byte of a character not yet whole).
                first = time.perf_counter() - sent
    return generated, first


async def _streams(
    url: str, model: str, count: int, tokens: int
) -> tuple[list[int], list[float], float]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(_one_stream(client, model, n, tokens) for n in range(count))
        )
        wall = time.perf_counter() - started
    return [r[0] for r in results], [r[1] for r in results], wall


async def _steady(
    url: str, model: str, count: int, tokens: int, seconds: float, first: int = 0, seed: int = 0
) -> tuple[list[int], list[float], float]:
    """``count`` clients, each starting a new stream as soon as its last one ended,
    for ``seconds``: streams join a batch that is already running, as they do in
    service. As in service, they do not arrive in step: each client's first stream
    starts at a random moment of the first second, and each stream asks for a random
    number of tokens between half and one and a half times ``tokens``. Both come from
    one generator seeded with ``count``: every run draws the same start moments, and
    the same sequence of lengths, but which client's stream gets which length depends
    on the order the streams end in, that is on scheduling. Streams begun in the first
    quarter are left out of the figures. ``first``: the first client's number (its
    prompts' tag); ``seed`` is added to the generator's seed."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    generated: list[int] = []
    firsts: list[float] = []
    draw = random.Random(count + seed)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        measured_from = started + seconds / 4

        every: list[tuple[int, float]] = []

        async def loop(n: int) -> None:
            await asyncio.sleep(draw.random())
            round_ = 0
            while time.perf_counter() - started < seconds:
                began = time.perf_counter()
                length = draw.randint(max(1, tokens // 2), tokens * 3 // 2)
                count_, first = await _one_stream(client, model, n * 1000 + round_, length)
                every.append((count_, first))
                if began >= measured_from:
                    generated.append(count_)
                    firsts.append(first)
                round_ += 1

        await asyncio.gather(*(loop(n) for n in range(first, first + count)))
        if not generated:  # streams slower than the run: count them all
            print(f"  ({model}: no stream began after the first quarter; all are counted)")
            generated, firsts = [c for c, _ in every], [f for _, f in every]
            measured_from = started
        wall = time.perf_counter() - measured_from
    return generated, firsts, wall


def _steady_in_process(
    url: str, model: str, count: int, tokens: int, seconds: float, first: int, seed: int
) -> tuple[list[int], list[float], float, float]:
    """:func:`_steady` in a client process of its own, and that process's CPU seconds."""
    cpu = time.process_time()
    generated, firsts, wall = asyncio.run(
        _steady(url, model, count, tokens, seconds, first=first, seed=seed)
    )
    return generated, firsts, wall, time.process_time() - cpu


def _steady_clients(
    url: str, model: str, count: int, tokens: int, seconds: float, processes: int
) -> tuple[list[int], list[float], float, float]:
    """:func:`_steady` with its ``count`` clients spread over ``processes`` client
    processes. In one process, the 32 streams' tokens of a step arrive together and
    their parsing (about 0.2 ms of CPU each) holds its event loop for several
    milliseconds, so a client that sends its next request then waits for that: the
    load generator's lag, not the server's, and a time to first token measured too
    long. Returns what :func:`_steady` does, and the clients' CPU seconds."""
    processes = max(1, min(processes, count))
    shares = [count // processes + (i < count % processes) for i in range(processes)]
    starts = [sum(shares[:i]) for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        runs = list(
            pool.map(
                _steady_in_process,
                *zip(
                    *(
                        (url, model, share, tokens, seconds, start, i)
                        for i, (share, start) in enumerate(zip(shares, starts, strict=True))
                    ),
                    strict=True,
                ),
            )
        )
    generated = [g for run in runs for g in run[0]]
    firsts = [f for run in runs for f in run[1]]
    return generated, firsts, max(run[2] for run in runs), sum(run[3] for run in runs)


async def _embeddings(url: str, model: str) -> float:
    limits = httpx.Limits(max_connections=EMBED_REQUESTS)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(n: int) -> None:
            body = {
                "model": model,
                "input": f"text number {n}: in order to form a more perfect union",
            }
            answer = await client.post("/v1/embeddings", json=body)
            answer.raise_for_status()

        started = time.perf_counter()
        for _ in range(EMBED_ROUNDS):
            await asyncio.gather(*(one(n) for n in range(EMBED_REQUESTS)))
        return time.perf_counter() - started


def _engine_stats(clients: dict[int, httpx.Client], model: str) -> list[dict[str, Any]]:
    rows = []
    for client in clients.values():
        engines = client.get("/debug/identity").json()["ai"]["engines"]
        rows += [e["stats"] for e in engines if e["model"] == model]
    return rows


def _mean_batch(before: list[dict[str, Any]], after: list[dict[str, Any]], kind: str) -> float:
    count_key, items_key = ("steps", "stepped") if kind == "steps" else ("jobs", "items")
    done = sum((a[kind] or {}).get(count_key, 0) for a in after) - sum(
        (b[kind] or {}).get(count_key, 0) for b in before
    )
    items = sum((a[kind] or {}).get(items_key, 0) for a in after) - sum(
        (b[kind] or {}).get(items_key, 0) for b in before
    )
    return items / done if done else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,8,32,128")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--embd", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="runs per cell; medians shown")
    parser.add_argument(
        "--steady",
        type=float,
        default=0.0,
        help="seconds of steady load (each client opens its next stream when its last "
        "one ends; the first quarter is not counted); 0: one burst of streams at once",
    )
    parser.add_argument(
        "--streams-per-client",
        type=int,
        default=8,
        help="with --steady: at most this many streams per client process",
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="which model rows to measure (batched, alone); both by default",
    )
    parser.add_argument(
        "--native-threads", default="0", help="the workers' native_threads (0: automatic)"
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="the batched model's prefill_chunk (0: every prompt whole in one step)",
    )
    parser.add_argument(
        "--prompts-first",
        choices=("true", "false"),
        default="true",
        help="the batched model's prompts_first: steps with prompts feed only them",
    )
    parser.add_argument(
        "--decode-batch",
        type=int,
        default=0,
        help="the batched model's decode_batch: decoding streams fed per step (0: all)",
    )
    args = parser.parse_args()
    counts = [int(x) for x in args.streams.split(",")]
    models = {name: MODELS[name] for name in args.models.split(",")}
    config = GPT2Config(
        n_layer=args.layers, n_head=args.heads, n_embd=args.embd, vocab_size=260, n_ctx=512
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = folder / "bench.safetensors"
        size = write_random_weights(weights, config, seed=1)
        print(
            f"model: {args.layers} layers x {args.embd}, {size / 1e6:.1f} MB; "
            f"{args.workers} worker(s), native_threads {args.native_threads}, "
            f"prefill_chunk {args.prefill_chunk}, prompts_first {args.prompts_first}, "
            f"decode_batch {args.decode_batch}; "
            f"{args.tokens} tokens per stream; "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        env = {
            "QUART_SERVICE_DATA_DIR": str(folder / "data"),
            "QUART_SERVICE_REFRESH_INTERVAL": "0.5",
            "QUART_SERVICE_ADMIN_TOKEN": TOKEN,
            "QUART_SERVICE_IDENTITY_ENDPOINT": "1",
            "QUART_SERVICE_ACCESS_LOG": "0",
            "QUART_SERVICE_EXECUTOR_QUEUE": "1000",
            "QUART_SERVICE_NATIVE_THREADS": args.native_threads,
        }
        with (
            running_server(folder, workers=args.workers, env=env) as server,
            pinned_workers(server, args.workers) as clients,
        ):
            for name, knobs in models.items():
                chunk = (
                    {
                        "prefill_chunk": args.prefill_chunk,
                        "prompts_first": args.prompts_first == "true",
                        "decode_batch": args.decode_batch,
                    }
                    if name == "batched"
                    else {}
                )
                put_model(server, name, {"weights": str(weights), **knobs, **chunk})
            wait_all(clients, "/data", lambda a: set(models) <= set(a["models"]), timeout=15)
            pids = server.worker_pids()
            for name in models:  # build each engine in every worker, warm the caches
                for client in clients.values():
                    body = {"model": name, "prompt": "warm", "max_tokens": 4}
                    client.post("/v1/completions", json=body, timeout=60).raise_for_status()
                asyncio.run(_streams(server.url, name, 8, args.tokens))  # untimed
            rows: dict[tuple[int, str], dict[str, float]] = {}
            for count in counts:
                for name in models:
                    cells: list[dict[str, float]] = []
                    for _ in range(args.rounds):
                        before = _engine_stats(clients, name)
                        worker_cpu, own_cpu = cpu_seconds(pids), time.process_time()
                        clients_cpu = 0.0  # client processes' CPU, with --steady
                        if args.steady:
                            received, firsts, wall, clients_cpu = _steady_clients(
                                server.url,
                                name,
                                count,
                                args.tokens,
                                args.steady,
                                math.ceil(count / args.streams_per_client),
                            )
                        else:
                            received, firsts, wall = asyncio.run(
                                _streams(server.url, name, count, args.tokens)
                            )
                        worker_cpu = cpu_seconds(pids) - worker_cpu
                        own_cpu = time.process_time() - own_cpu + clients_cpu
                        tokens = sum(received)
                        assert tokens > 0, "no tokens"
                        cells.append(
                            {
                                "tokens_per_s": tokens / wall,
                                "cpu_ms_per_token": worker_cpu / tokens * 1000,
                                "ttft_p50_ms": _percentile(firsts, 0.5) * 1000,
                                "ttft_p99_ms": _percentile(firsts, 0.99) * 1000,
                                "mean_batch": _mean_batch(
                                    before, _engine_stats(clients, name), "steps"
                                ),
                                "client_cpu_ms_per_token": own_cpu / tokens * 1000,
                            }
                        )
                    rows[count, name] = {k: median(c[k] for c in cells) for k in cells[0]}
                    row = rows[count, name]
                    print(
                        f"{count:>4} streams {name:>8}: {row['tokens_per_s']:8.0f} tokens/s  "
                        f"{row['cpu_ms_per_token']:6.2f} ms CPU/token  TTFT p50 "
                        f"{row['ttft_p50_ms']:7.1f} p99 {row['ttft_p99_ms']:7.1f} ms  "
                        f"batch {row['mean_batch']:5.1f}  client "
                        f"{row['client_cpu_ms_per_token']:.2f} ms/token",
                        flush=True,
                    )
            embed: dict[str, dict[str, float]] = {}
            for name in models:
                before = _engine_stats(clients, name)
                worker_cpu = cpu_seconds(pids)
                wall = asyncio.run(_embeddings(server.url, name))
                worker_cpu = cpu_seconds(pids) - worker_cpu
                requests = EMBED_REQUESTS * EMBED_ROUNDS
                embed[name] = {
                    "requests_per_s": requests / wall,
                    "cpu_ms_per_request": worker_cpu / requests * 1000,
                    "mean_batch": _mean_batch(before, _engine_stats(clients, name), "embeddings"),
                }
                print(
                    f"embeddings {name:>8}: {embed[name]['requests_per_s']:7.0f} requests/s  "
                    f"{embed[name]['cpu_ms_per_request']:6.2f} ms CPU/request  "
                    f"texts per job {embed[name]['mean_batch']:.1f}",
                    flush=True,
                )
    if set(models) == set(MODELS):
        _print_comparison(counts, rows, embed)
    if "batched" in models and 1 in counts and 32 in counts:
        single = rows[1, "batched"]["ttft_p99_ms"]
        at32 = rows[32, "batched"]["ttft_p99_ms"]
        print(
            f"\ntarget at 32 streams: TTFT p99 {at32:.0f} ms against one stream's "
            f"{single:.0f} ms: {at32 / single:.2f}x (at most 2x)"
        )


def _print_comparison(
    counts: list[int],
    rows: dict[tuple[int, str], dict[str, float]],
    embed: dict[str, dict[str, float]],
) -> None:
    print(
        "\n| streams | batched tokens/s | alone tokens/s | ratio | CPU ms/token batched / alone "
        "| TTFT p50 / p99 ms batched | TTFT p50 / p99 ms alone | mean batch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for count in counts:
        b, a = rows[count, "batched"], rows[count, "alone"]
        print(
            f"| {count} | {b['tokens_per_s']:,.0f} | {a['tokens_per_s']:,.0f} | "
            f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x | {b['cpu_ms_per_token']:.2f} / "
            f"{a['cpu_ms_per_token']:.2f} | {b['ttft_p50_ms']:.0f} / {b['ttft_p99_ms']:.0f} | "
            f"{a['ttft_p50_ms']:.0f} / {a['ttft_p99_ms']:.0f} | {b['mean_batch']:.1f} |"
        )
    if 32 in counts:
        ratio = rows[32, "batched"]["tokens_per_s"] / rows[32, "alone"]["tokens_per_s"]
        print(f"\ntarget at 32 streams: batched / alone tokens/s {ratio:.2f}x (at least 4x)")
    b, a = embed["batched"], embed["alone"]
    print(
        f"embeddings: batched / alone requests/s {b['requests_per_s'] / a['requests_per_s']:.2f}x, "
        f"CPU per request {b['cpu_ms_per_request'] / a['cpu_ms_per_request']:.2f}x"
    )


if __name__ == "__main__":
    main()
