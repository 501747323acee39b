"""What the batching primitives cost and buy, in process, on the worker's pool class.

    python -m bench.batching_overhead [--levels 1,8,32,128] [--tokens 200] [--dim 512]

Streams: ``N`` streams of ``--tokens`` steps each, through a :class:`StepBatcher`
(one pool job per step for all streams) against the unbatched way (one pool job per
token per stream, as an engine without batching does). Two step functions: ``noop``
(the bookkeeping alone: what the batcher costs per token) and ``matvec`` (a numpy
[B, dim] x [dim, dim] product, the shape of a decoding step's projections: what
sharing the step buys). Calls: ``N`` concurrent callers, each calling again as soon as
it has its result, of a :class:`Batcher` (``--max-wait``, default 0: a batch is the
calls of one event-loop turn, plus those that arrived while the last job ran) against
one pool job per call. Prints process CPU per token or call (the event loop and the
pool threads together), tokens or calls per second, and the mean batch size.

Run it with OPENBLAS_NUM_THREADS=1 (set here before numpy loads, unless already set)
so one pool thread is one core, as the worker's native thread budget would have it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from quart_service.batching import Batcher, StepBatcher
from quart_service.executor import BoundedExecutor

Run = Callable[..., Awaitable[Any]]


@dataclass(eq=False)
class _State:
    left: int
    vector: np.ndarray[Any, Any]
    finished: bool = False


class _Model:
    def __init__(self, dim: int) -> None:
        rng = np.random.default_rng(0)
        self.weights = rng.standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim)

    def noop(self, states: Sequence[_State]) -> list[int]:
        for state in states:
            state.left -= 1
            state.finished = state.left <= 0
        return [0] * len(states)

    def matvec(self, states: Sequence[_State]) -> list[int]:
        stacked = np.stack([state.vector for state in states])
        product = np.tanh(stacked @ self.weights)
        for state, row in zip(states, product, strict=True):
            state.vector = row
        return self.noop(states)


async def _batched(run: Run, step: Any, states: list[_State], max_batch: int) -> float:
    batcher: StepBatcher[_State, int] = StepBatcher(step, run, max_batch=max_batch)

    async def one(state: _State) -> None:
        async for _ in batcher.stream(state):
            pass

    await asyncio.gather(*(one(state) for state in states))
    return batcher.stats().mean_batch


async def _unbatched(run: Run, step: Any, states: list[_State], _max_batch: int) -> float:
    async def one(state: _State) -> None:
        while not state.finished:
            await run(step, [state])

    await asyncio.gather(*(one(state) for state in states))
    return 1.0


async def _streams(args: argparse.Namespace, run: Run, model: _Model) -> None:
    print(f"streams: {args.tokens} tokens each, dim {args.dim}, pool {args.threads} threads")
    print(f"{'step':>7} {'mode':>9} {'N':>4} {'tok/s':>9} {'CPU µs/tok':>11} {'batch':>6}")
    for name in ("noop", "matvec"):
        step = getattr(model, name)
        for level in args.levels:
            for mode, how in (("batched", _batched), ("unbatched", _unbatched)):
                states = [_State(args.tokens, np.ones(args.dim, np.float32)) for _ in range(level)]
                cpu, wall = time.process_time(), time.perf_counter()
                batch = await how(run, step, states, args.max_batch)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                tokens = level * args.tokens
                print(
                    f"{name:>7} {mode:>9} {level:>4} {tokens / wall:>9,.0f} "
                    f"{cpu / tokens * 1e6:>11.1f} {batch:>6.1f}"
                )


async def _calls(args: argparse.Namespace, run: Run, model: _Model) -> None:
    def embed(items: Sequence[int]) -> list[float]:
        stacked = np.ones((len(items), args.dim), np.float32)
        return [float(row[0]) for row in np.tanh(stacked @ model.weights)]

    print(f"\ncalls: {args.calls} calls per level, dim {args.dim}, max_wait {args.max_wait:g} s")
    print(f"{'mode':>9} {'N':>4} {'calls/s':>9} {'CPU µs/call':>12} {'batch':>6}")
    for level in args.levels:
        batcher = Batcher(embed, run, max_batch=args.max_batch, max_wait=args.max_wait)
        for mode in ("batched", "unbatched"):
            call: Callable[[int], Awaitable[Any]] = (
                batcher.call if mode == "batched" else (lambda i: run(embed, [i]))
            )

            async def client(count: int, call: Callable[[int], Awaitable[Any]] = call) -> None:
                for i in range(count):
                    await call(i)

            cpu, wall = time.process_time(), time.perf_counter()
            per = max(1, args.calls // level)
            await asyncio.gather(*(client(per) for _ in range(level)))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            done = per * level
            batch = batcher.stats().mean_batch if mode == "batched" else 1.0
            print(
                f"{mode:>9} {level:>4} {done / wall:>9,.0f} {cpu / done * 1e6:>12.1f} {batch:>6.1f}"
            )


async def _main(args: argparse.Namespace) -> None:
    pool = BoundedExecutor(args.threads, 1024)

    async def run(fn: Callable[..., Any], *call_args: Any) -> Any:
        return await asyncio.wrap_future(pool.submit_admitted(fn, *call_args))

    model = _Model(args.dim)
    try:
        await _streams(args, run, model)
        await _calls(args, run, model)
    finally:
        pool.shutdown(wait=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,8,32,128")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--max-wait", type=float, default=0.0, help="the Batcher's, seconds")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as the workers do")
    args = parser.parse_args()
    args.levels = [int(level) for level in args.levels.split(",")]
    if args.uvloop:
        import uvloop

        uvloop.run(_main(args))
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
