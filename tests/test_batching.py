"""Batching over the real pool: grouping, joining and leaving, cancellation, failures.

Everything runs in process on a real event loop, asyncio's and uvloop (the workers'
loop: its ``call_at`` and clock differ), and a real BoundedExecutor (the worker's pool
class, jobs submitted as the engine host does: ``submit_admitted``).
The jobs are toys that record the batches they saw. Every wait is bounded, so a hang
fails the test instead of holding CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from quart import Quart, Response
from quart.typing import TestAppProtocol as RunningApp

from quart_service import Settings, create_app, sse
from quart_service.batching import Batcher, StepBatcher
from quart_service.context import pool as worker_pool
from quart_service.executor import BoundedExecutor

Run = Callable[..., Awaitable[Any]]
LIMIT = 2.0  # seconds any single wait in these tests may take before it is a failure


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def both_loops(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test once on asyncio's event loop and once on uvloop's."""

    def on_loop(loop: str, **fixtures: Any) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(test(**fixtures))

    for name in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(on_loop, name, getattr(test, name))
    loop = inspect.Parameter("loop", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    signature = inspect.signature(test)
    on_loop.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[loop, *signature.parameters.values()], return_annotation=None
    )
    parametrized: Callable[..., None] = pytest.mark.parametrize("loop", list(LOOPS))(on_loop)
    return parametrized


class Boom(Exception):
    pass


@pytest.fixture
def pool() -> Iterator[BoundedExecutor]:
    executor = BoundedExecutor(2, 8)
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def run(pool: BoundedExecutor) -> Run:
    """What EngineContext.run_sync does: admitted work on the shared pool."""

    async def run_sync(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(pool.submit_admitted(fn, *args))

    return run_sync


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(LIMIT):
        while not condition():
            await asyncio.sleep(0.001)


async def idle(batcher: StepBatcher[Any, Any], pool: BoundedExecutor) -> None:
    """The stepping task has ended and no pool thread is busy."""
    await until(lambda: not batcher.stats().running and pool.stats().active == 0)


# -- StepBatcher ----------------------------------------------------------------------


@dataclass(eq=False)
class Counter:
    """A toy stream state: counts up to ``limit``, one per step."""

    name: str
    limit: int
    n: int = 0
    finished: bool = False


class Steps:
    """A toy step: counts every state up by one and records the batches it saw.

    Gated, each step waits for a permit from the test (``release``), so the test
    decides what happens while a step is on its thread."""

    def __init__(self, *, gated: bool = False, fail_on: int | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gated = gated
        self.fail_on = fail_on  # the 1-based step that raises
        self.error = Boom("the step failed")
        self._permits = threading.Semaphore(0)

    def __call__(self, states: Sequence[Counter]) -> list[str]:
        self.batches.append([state.name for state in states])
        if self.gated and not self._permits.acquire(timeout=LIMIT):
            raise TimeoutError("the test never let this step run")
        if len(self.batches) == self.fail_on:
            raise self.error
        outputs = []
        for state in states:
            state.n += 1
            state.finished = state.n >= state.limit
            outputs.append(f"{state.name}{state.n}")
        return outputs

    def release(self, steps: int = 1) -> None:
        for _ in range(steps):
            self._permits.release()


def expected(name: str, limit: int) -> list[str]:
    return [f"{name}{n}" for n in range(1, limit + 1)]


async def collect(stream: AsyncIterator[str]) -> list[str]:
    return [output async for output in stream]


def consume(batcher: StepBatcher[Counter, str], state: Counter) -> asyncio.Task[list[str]]:
    return asyncio.create_task(collect(batcher.stream(state)))


@both_loops
async def test_concurrent_streams_share_each_step_and_leave_when_finished(
    run: Run, pool: BoundedExecutor
) -> None:
    steps = Steps()
    batcher = StepBatcher(steps, run, max_batch=8)
    a, b, c = Counter("A", 3), Counter("B", 5), Counter("C", 1)
    async with asyncio.timeout(LIMIT):
        outputs = await asyncio.gather(*(collect(batcher.stream(s)) for s in (a, b, c)))
    assert outputs == [expected("A", 3), expected("B", 5), expected("C", 1)]
    # One step for all active states; each leaves after the step that finished it.
    assert steps.batches == [["A", "B", "C"], ["A", "B"], ["A", "B"], ["B"], ["B"]]
    stats = batcher.stats()
    assert (stats.steps, stats.stepped, stats.largest_batch) == (5, 9, 3)
    assert stats.mean_batch == pytest.approx(9 / 5)
    await idle(batcher, pool)
    assert (batcher.stats().active, batcher.stats().waiting) == (0, 0)


@both_loops
async def test_a_stream_joins_between_steps_never_during_one(run: Run) -> None:
    steps = Steps(gated=True)
    batcher = StepBatcher(steps, run, max_batch=8)
    first = consume(batcher, Counter("A", 3))
    await until(lambda: len(steps.batches) == 1)  # step 1 is on its thread
    second = consume(batcher, Counter("B", 2))
    await until(lambda: batcher.stats().waiting == 1)
    assert batcher.stats().active == 1
    steps.release(10)
    async with asyncio.timeout(LIMIT):
        assert await first == expected("A", 3)
        assert await second == expected("B", 2)
    assert steps.batches == [["A"], ["A", "B"], ["A", "B"]]


@both_loops
async def test_a_full_batch_makes_new_streams_wait_for_a_freed_slot(run: Run) -> None:
    steps = Steps(gated=True)
    batcher = StepBatcher(steps, run, max_batch=2)
    tasks = [consume(batcher, Counter(name, limit)) for name, limit in [("A", 1), ("B", 3)]]
    await until(lambda: len(steps.batches) == 1)
    tasks.append(consume(batcher, Counter("C", 2)))
    await until(lambda: batcher.stats().waiting == 1)
    steps.release(10)
    async with asyncio.timeout(LIMIT):
        outputs = await asyncio.gather(*tasks)
    assert outputs == [expected("A", 1), expected("B", 3), expected("C", 2)]
    # C takes A's slot at the step after A finished.
    assert steps.batches == [["A", "B"], ["B", "C"], ["B", "C"]]


@both_loops
async def test_a_cancelled_consumer_leaves_before_the_next_step_and_frees_its_slot(
    run: Run, pool: BoundedExecutor
) -> None:
    steps = Steps(gated=True)
    batcher = StepBatcher(steps, run, max_batch=2)
    a, b, c = Counter("A", 10), Counter("B", 4), Counter("C", 2)
    gone, staying = consume(batcher, a), consume(batcher, b)
    await until(lambda: len(steps.batches) == 1)
    waiting = consume(batcher, c)
    await until(lambda: batcher.stats().waiting == 1)
    # The client goes away while a step for it is on a thread (the service cancels the
    # response's task; the cancellation arrives where the stream waits).
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    stats = batcher.stats()
    assert (stats.active, stats.waiting, stats.left_early) == (1, 1, 1)
    steps.release(10)
    async with asyncio.timeout(LIMIT):
        assert await staying == expected("B", 4)
        assert await waiting == expected("C", 2)
    # The running step finished for A (a thread cannot be interrupted); the next one
    # ran without it, and C took its slot.
    assert steps.batches == [["A", "B"], ["B", "C"], ["B", "C"], ["B"]]
    assert a.n == 1
    await idle(batcher, pool)


@both_loops
async def test_a_stream_timeout_leaves_the_batch_and_no_thread_keeps_computing(
    run: Run, pool: BoundedExecutor
) -> None:
    steps = Steps(gated=True)
    batcher = StepBatcher(steps, run, max_batch=4)
    state = Counter("A", 1000)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # what a stream's idle timeout does: cancel
            await collect(batcher.stream(state))
    assert batcher.stats().active == 0
    steps.release(10)
    await idle(batcher, pool)
    await asyncio.sleep(0.02)
    assert steps.batches == [["A"]]  # no step after the one that was running
    assert state.n == 1


@both_loops
async def test_aclose_mid_stream_removes_it_before_the_next_step(run: Run) -> None:
    steps = Steps(gated=True)
    batcher = StepBatcher(steps, run, max_batch=4)
    a = Counter("A", 100)
    early = batcher.stream(a)
    first = asyncio.create_task(anext(early))
    rest = consume(batcher, Counter("B", 3))
    steps.release()
    async with asyncio.timeout(LIMIT):
        assert await first == "A1"
    await until(lambda: len(steps.batches) == 2)  # step 2 is on its thread, with A
    await early.aclose()  # the consumer stops iterating
    assert batcher.stats().active == 1
    steps.release(10)
    async with asyncio.timeout(LIMIT):
        assert await rest == expected("B", 3)
    assert steps.batches == [["A", "B"], ["A", "B"], ["B"]]
    assert a.n == 2


@both_loops
async def test_a_step_whose_streams_all_left_before_it_reached_a_thread_is_not_run(
    run: Run, pool: BoundedExecutor
) -> None:
    steps = Steps()
    batcher = StepBatcher(steps, run, max_batch=4)
    busy = threading.Event()
    blockers = [pool.submit(busy.wait, LIMIT) for _ in range(pool.max_threads)]
    stream = consume(batcher, Counter("A", 5))
    await until(lambda: pool.stats().queued == 1)  # the step waits for a thread
    stream.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stream
    busy.set()
    await idle(batcher, pool)
    assert steps.batches == []  # step() never ran for nobody
    assert batcher.stats().skipped_steps == 1
    assert all(blocker.result(timeout=LIMIT) for blocker in blockers)


@both_loops
async def test_a_slow_consumer_sits_steps_out_without_holding_the_others(
    run: Run, pool: BoundedExecutor
) -> None:
    steps = Steps()
    batcher = StepBatcher(steps, run, max_batch=4, buffer=2)
    slow = batcher.stream(Counter("A", 8))
    async with asyncio.timeout(LIMIT):
        taken = [await anext(slow)]  # joined; then its consumer stops reading
        fast = await collect(batcher.stream(Counter("B", 10)))
    assert fast == expected("B", 10)
    await until(lambda: batcher.stats().paused == 1 and pool.stats().active == 0)
    stepped = len(steps.batches)
    with_a = sum("A" in batch for batch in steps.batches)
    assert with_a <= 1 + 2  # its first output, then a full buffer: it sits out
    await asyncio.sleep(0.02)
    assert len(steps.batches) == stepped  # all active streams paused: no step runs
    assert batcher.stats().running  # ... and it resumes when the consumer reads
    async with asyncio.timeout(LIMIT):
        taken += [output async for output in slow]
    assert taken == expected("A", 8)  # nothing lost, in order
    await idle(batcher, pool)


@both_loops
async def test_a_paused_stream_gives_its_slot_to_a_waiting_one_and_resumes_first(
    run: Run, pool: BoundedExecutor
) -> None:
    steps = Steps()
    batcher = StepBatcher(steps, run, max_batch=1, buffer=1)
    slow = batcher.stream(Counter("A", 4))
    async with asyncio.timeout(LIMIT):
        taken = [await anext(slow)]  # then its consumer stops reading
        await until(lambda: batcher.stats().paused == 1)
        # The only slot is A's, but A's client reads nothing: B takes the slot.
        assert await collect(batcher.stream(Counter("B", 3))) == expected("B", 3)
        stats = batcher.stats()
        assert (stats.active, stats.paused, stats.running) == (0, 1, False)  # A parked
        taken += [output async for output in slow]  # A reads again: back in the batch
    assert taken == expected("A", 4)
    assert steps.batches == [["A"], ["A"], ["B"], ["B"], ["B"], ["A"], ["A"]]
    await idle(batcher, pool)


@both_loops
async def test_a_step_exception_ends_every_stream_of_that_step_and_the_batcher_recovers(
    run: Run, pool: BoundedExecutor
) -> None:
    steps = Steps(fail_on=2)
    batcher = StepBatcher(steps, run, max_batch=8)
    seen: list[list[str]] = []
    errors: list[BaseException] = []

    async def reader(state: Counter) -> None:
        outputs: list[str] = []
        seen.append(outputs)
        try:
            async for output in batcher.stream(state):
                outputs.append(output)
        except Boom as exc:
            errors.append(exc)

    async with asyncio.timeout(LIMIT):
        await asyncio.gather(*(reader(Counter(name, 5)) for name in "ABC"))
    assert seen == [["A1"], ["B1"], ["C1"]]  # the outputs before the failure, then it
    assert len(errors) == 3
    assert all(error is steps.error for error in errors)
    assert batcher.stats().failed_steps == 1
    await idle(batcher, pool)
    async with asyncio.timeout(LIMIT):
        assert await collect(batcher.stream(Counter("D", 2))) == expected("D", 2)
    assert steps.batches == [["A", "B", "C"], ["A", "B", "C"], ["D"], ["D"]]


@both_loops
async def test_the_empty_output_is_not_handed_over(run: Run) -> None:
    """A step with nothing for a stream (the engine's prompt fed over several steps)
    gives it ``empty``: its consumer never sees it, and a stream whose finishing step
    gave it nothing still ends."""

    def step(states: Sequence[Counter]) -> list[str]:
        outputs = []
        for state in states:
            state.n += 1
            state.finished = state.n >= state.limit
            # Odd steps give nothing; so does the last step of a stream of odd length.
            outputs.append(f"{state.name}{state.n}" if state.n % 2 == 0 else "")
        return outputs

    batcher = StepBatcher(step, run, max_batch=4, empty="")
    async with asyncio.timeout(LIMIT):
        a, b = await asyncio.gather(
            collect(batcher.stream(Counter("A", 4))), collect(batcher.stream(Counter("B", 5)))
        )
    assert (a, b) == (["A2", "A4"], ["B2", "B4"])
    assert batcher.stats().steps == 5
    # Without ``empty`` every output is handed over, "" included.
    async with asyncio.timeout(LIMIT):
        assert await collect(StepBatcher(step, run, max_batch=4).stream(Counter("C", 3))) == [
            "",
            "C2",
            "",
        ]


@both_loops
async def test_a_wrong_number_of_outputs_fails_the_streams_of_that_step(run: Run) -> None:
    def step(states: Sequence[Counter]) -> list[str]:
        return []

    batcher = StepBatcher(step, run, max_batch=4)
    async with asyncio.timeout(LIMIT):
        with pytest.raises(ValueError, match="0 outputs for 1 states"):
            await collect(batcher.stream(Counter("A", 3)))


@both_loops
async def test_a_step_or_job_that_raises_stopiteration_fails_its_callers_instead_of_hanging(
    run: Run,
) -> None:
    # next() on an empty iterator inside the job: a future cannot carry StopIteration.
    def step(states: Sequence[Counter]) -> list[str]:
        return [next(iter([]))]

    def fn(items: Sequence[int]) -> list[int]:
        return [next(iter([]))]

    async with asyncio.timeout(LIMIT):
        with pytest.raises(RuntimeError, match="StopIteration"):
            await collect(StepBatcher(step, run, max_batch=2).stream(Counter("A", 2)))
        with pytest.raises(RuntimeError, match="StopIteration"):
            await Batcher(fn, run, max_batch=2, max_wait=0.0).call(1)


@both_loops
async def test_a_stepping_task_cancelled_under_its_streams_ends_them(run: Run) -> None:
    """What the event loop's shutdown does to the stepping task: its streams end with
    an error instead of waiting for a step that will never come."""
    steps = Steps(gated=True)
    batcher = StepBatcher(steps, run, max_batch=1)
    active = consume(batcher, Counter("A", 5))
    await until(lambda: len(steps.batches) == 1)
    waiting = consume(batcher, Counter("B", 5))
    await until(lambda: batcher.stats().waiting == 1)
    task = batcher._task  # private: the test stands in for the loop's shutdown
    assert task is not None
    task.cancel()
    async with asyncio.timeout(LIMIT):
        for stream in (active, waiting):
            with pytest.raises(RuntimeError, match="stopped"):
                await stream
    steps.release(10)
    assert not batcher.stats().running


@both_loops
async def test_the_stepping_task_stops_when_no_stream_is_left_and_starts_again(
    run: Run, pool: BoundedExecutor
) -> None:
    steps = Steps()
    batcher = StepBatcher(steps, run, max_batch=4)
    assert not batcher.stats().running
    async with asyncio.timeout(LIMIT):
        assert await collect(batcher.stream(Counter("A", 2))) == expected("A", 2)
    await idle(batcher, pool)
    await asyncio.sleep(0.02)
    assert len(steps.batches) == 2  # nothing runs while no stream is active
    async with asyncio.timeout(LIMIT):
        assert await collect(batcher.stream(Counter("B", 2))) == expected("B", 2)
    await idle(batcher, pool)
    assert steps.batches == [["A"], ["A"], ["B"], ["B"]]


@both_loops
async def test_a_waiting_stream_that_is_cancelled_never_joins(run: Run) -> None:
    steps = Steps(gated=True)
    batcher = StepBatcher(steps, run, max_batch=1)
    running = consume(batcher, Counter("A", 2))
    await until(lambda: len(steps.batches) == 1)
    waiting = consume(batcher, Counter("B", 2))
    await until(lambda: batcher.stats().waiting == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert batcher.stats().waiting == 0
    steps.release(10)
    async with asyncio.timeout(LIMIT):
        assert await running == expected("A", 2)
    assert steps.batches == [["A"], ["A"]]


@both_loops
async def test_a_finished_state_ends_without_a_step(run: Run) -> None:
    steps = Steps()
    batcher = StepBatcher(steps, run, max_batch=4)
    done = Counter("A", 3, finished=True)
    assert await collect(batcher.stream(done)) == []
    assert steps.batches == []
    assert not batcher.stats().running


@both_loops
async def test_steps_do_not_carry_a_streams_context(run: Run) -> None:
    """The stepping task outlives the request that started it: it must not keep that
    request's context (and what it references) alive."""
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    seen: list[str] = []

    def step(states: Sequence[Counter]) -> list[str]:
        seen.append(request_id.get("none"))
        for state in states:
            state.finished = True
        return ["x" for _ in states]

    async def request() -> list[str]:
        request_id.set("first request")
        return await collect(StepBatcher(step, run, max_batch=4).stream(Counter("A", 1)))

    async with asyncio.timeout(LIMIT):
        assert await asyncio.create_task(request()) == ["x"]
    assert seen == ["none"]


@both_loops
async def test_streams_that_finish_fail_and_leave_at_random_never_hang(
    run: Run, pool: BoundedExecutor
) -> None:
    rng = random.Random(14)
    max_batch = 6
    failing = set(rng.sample(range(1, 120), 6))  # the steps that raise
    seen: list[int] = []

    def step(states: Sequence[Counter]) -> list[str]:
        seen.append(len(states))
        assert 1 <= len(states) <= max_batch
        assert not any(state.finished for state in states)
        assert len({id(state) for state in states}) == len(states)
        if len(seen) in failing:
            raise Boom(f"step {len(seen)}")
        time.sleep(0.0005)  # long enough for streams to overlap, queue and leave mid-step
        outputs = []
        for state in states:
            state.n += 1
            state.finished = state.n >= state.limit
            outputs.append(f"{state.name}{state.n}")
        return outputs

    batcher = StepBatcher(step, run, max_batch=max_batch, buffer=rng.choice([1, 2, 4]))
    outcomes: dict[str, int] = {}

    async def client(i: int) -> None:
        state = Counter(f"s{i}-", rng.randint(1, 25))
        how = rng.choice(["whole", "whole", "aclose", "break", "cancel", "timeout", "slow"])
        after = rng.randint(0, 6)
        await asyncio.sleep(rng.random() * 0.01)
        outputs: list[str] = []

        async def read() -> None:
            async with contextlib.aclosing(batcher.stream(state)) as stream:
                async for output in stream:
                    outputs.append(output)
                    if how == "slow":
                        await asyncio.sleep(0.001)
                    if how == "aclose" and len(outputs) > after:
                        return

        try:
            if how == "break":
                async for output in batcher.stream(state):  # no aclose: the GC finalizes
                    outputs.append(output)
                    if len(outputs) > after:
                        break
            elif how in ("cancel", "timeout"):
                reading = asyncio.create_task(read())
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    if how == "timeout":
                        async with asyncio.timeout(rng.random() * 0.01):
                            await reading
                    else:
                        await asyncio.sleep(rng.random() * 0.01)
                        reading.cancel()
                        await reading
            else:
                await read()
        except Boom:
            pass
        # Whatever happened, the outputs came in order, none lost or repeated.
        assert outputs == expected(state.name, len(outputs))
        if how in ("whole", "slow") and len(outputs) < state.limit:
            assert state.n == len(outputs)  # it ended early: a step failed under it
        outcomes[how] = outcomes.get(how, 0) + 1

    async with asyncio.timeout(LIMIT * 3):
        await asyncio.gather(*(client(i) for i in range(60)))
    await idle(batcher, pool)
    stats = batcher.stats()
    assert (stats.active, stats.waiting) == (0, 0)
    assert stats.largest_batch <= max_batch
    assert sum(outcomes.values()) == 60


# -- through the service: sse() over a StepBatcher, clients that leave, timeouts ------


@dataclass
class Counting:
    """The app's batcher (made on first use, on the worker's pool) and its step."""

    steps: Steps
    batcher: StepBatcher[Counter, str] | None = None
    executor: BoundedExecutor | None = None

    def idle(self) -> bool:
        """The stepping task has ended and no thread of the worker's pool is busy."""
        assert self.batcher is not None
        assert self.executor is not None
        return not self.batcher.stats().running and self.executor.stats().active == 0


@pytest.fixture
def settings(tmp_path: Any) -> Settings:
    return Settings(
        identity_endpoint=True, data_dir=str(tmp_path / "data"), stream_idle_timeout=0.2
    )


@pytest.fixture
def counting() -> Counting:
    return Counting(Steps(gated=True))


@pytest.fixture
def app(settings: Settings, counting: Counting) -> Quart:
    app = create_app(settings)

    @app.get("/count/<name>/<int:limit>")
    async def count(name: str, limit: int) -> Response:
        executor = worker_pool()
        executor.check_capacity()  # admission, as the API does before a stream starts
        if counting.batcher is None:

            async def run(fn: Callable[..., Any], *args: Any) -> Any:
                return await asyncio.wrap_future(executor.submit_admitted(fn, *args))

            counting.batcher = StepBatcher(counting.steps, run, max_batch=2)
            counting.executor = executor
        return sse(counting.batcher.stream(Counter(name, limit)))

    return app


async def test_a_client_that_leaves_an_sse_stream_frees_its_slot_for_a_waiting_one(
    test_app: RunningApp, counting: Counting
) -> None:
    steps, client = counting.steps, test_app.test_client()
    async with asyncio.timeout(LIMIT), client.request("/count/A/1000") as leaving:
        await leaving.send_complete()
        await until(lambda: len(steps.batches) == 1)
        batcher = counting.batcher
        assert batcher is not None
        steps.release()
        assert await leaving.receive() == b"data: A1\n\n"
        await until(lambda: len(steps.batches) == 2)  # step 2 is on its thread, with A
        others = [asyncio.create_task(client.get(f"/count/{n}/2")) for n in "BC"]
        await until(lambda: batcher.stats().waiting == 2)  # one slot for two
        await leaving.disconnect()
        await until(lambda: batcher.stats().left_early == 1)
        assert batcher.stats().active == 0
        steps.release(10)
        bodies = [await (await task).get_data(as_text=True) for task in others]
    assert bodies == ["data: B1\n\ndata: B2\n\n", "data: C1\n\ndata: C2\n\n"]
    # A's slot went to the next waiting stream at once; nobody stepped A again.
    assert steps.batches == [["A"], ["A"], ["B", "C"], ["B", "C"]]
    await until(counting.idle)


async def test_an_sse_stream_timeout_leaves_the_batch(
    test_app: RunningApp, counting: Counting
) -> None:
    steps = counting.steps
    async with asyncio.timeout(LIMIT):
        # The step never finishes in time: the stream's idle timeout cuts it.
        response = await test_app.test_client().get("/count/A/5")
        body = await response.get_data(as_text=True)
    assert '"code":"stream_idle_timeout"' in body
    batcher = counting.batcher
    assert batcher is not None
    assert (batcher.stats().active, batcher.stats().left_early) == (0, 1)
    steps.release(10)
    await until(counting.idle)
    assert steps.batches == [["A"]]


# -- Batcher --------------------------------------------------------------------------


class Calls:
    """A toy batch function: doubles each item, records batches and concurrency."""

    def __init__(self, *, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.running = self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, items: Sequence[int]) -> list[int]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            self.batches.append(list(items))
            if self.gate is not None and not self.gate.wait(LIMIT):
                raise TimeoutError("the test never opened the gate")
            if -1 in items:
                raise Boom("a bad item")
            return [2 * item for item in items]
        finally:
            with self._lock:
                self.running -= 1


@both_loops
async def test_concurrent_calls_are_grouped_into_fewer_jobs(run: Run) -> None:
    calls = Calls()
    batcher = Batcher(calls, run, max_batch=4, max_wait=0.02)
    async with asyncio.timeout(LIMIT):
        results = await asyncio.gather(*(batcher.call(i) for i in range(10)))
    assert results == [2 * i for i in range(10)]
    assert [len(batch) for batch in calls.batches] == [4, 4, 2]
    assert sorted(i for batch in calls.batches for i in batch) == list(range(10))
    stats = batcher.stats()
    assert (stats.jobs, stats.items, stats.largest_batch, stats.pending) == (3, 10, 4, 0)
    assert stats.mean_batch == pytest.approx(10 / 3)


@both_loops
async def test_a_full_batch_leaves_at_once_and_a_partial_one_waits_for_max_wait(
    run: Run,
) -> None:
    calls = Calls()
    batcher = Batcher(calls, run, max_batch=3, max_wait=30.0)
    async with asyncio.timeout(LIMIT):  # full: no waiting for max_wait
        assert await asyncio.gather(*(batcher.call(i) for i in (1, 2, 3))) == [2, 4, 6]
    lone = asyncio.create_task(batcher.call(4))
    await asyncio.sleep(0.05)
    assert batcher.stats().pending == 1  # not full: it waits for more calls
    lone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lone
    assert batcher.stats().pending == 0
    assert calls.batches == [[1, 2, 3]]


@both_loops
async def test_calls_within_max_wait_share_a_job(run: Run) -> None:
    calls = Calls()
    batcher = Batcher(calls, run, max_batch=8, max_wait=0.3)
    first = asyncio.create_task(batcher.call(1))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(batcher.call(2))
    await asyncio.sleep(0.02)
    assert batcher.stats().pending == 2  # the oldest has waited less than max_wait
    async with asyncio.timeout(LIMIT):
        assert (await first, await second) == (2, 4)
    assert calls.batches == [[1, 2]]


@both_loops
async def test_max_wait_zero_still_groups_the_calls_of_one_event_loop_turn(run: Run) -> None:
    calls = Calls()
    batcher = Batcher(calls, run, max_batch=8, max_wait=0.0)
    async with asyncio.timeout(LIMIT):
        assert await asyncio.gather(*(batcher.call(i) for i in range(5))) == [0, 2, 4, 6, 8]
        # Callers woken together by a job's results call again together: one job.
        again = await asyncio.gather(*(batcher.call(i) for i in range(5)))
    assert again == [0, 2, 4, 6, 8]
    assert [len(batch) for batch in calls.batches] == [5, 5]


@both_loops
async def test_an_exception_fails_every_caller_of_its_batch_and_the_next_batch_runs(
    run: Run,
) -> None:
    calls = Calls()
    batcher = Batcher(calls, run, max_batch=3, max_wait=0.02)
    async with asyncio.timeout(LIMIT):
        outcomes = await asyncio.gather(
            *(batcher.call(i) for i in (1, -1, 3)), return_exceptions=True
        )
    assert all(isinstance(outcome, Boom) for outcome in outcomes)
    assert outcomes[0] is outcomes[1] is outcomes[2]
    async with asyncio.timeout(LIMIT):
        assert await batcher.call(5) == 10
    assert batcher.stats().failed_jobs == 1


@both_loops
async def test_a_caller_cancelled_while_waiting_is_taken_out_of_its_batch(run: Run) -> None:
    calls = Calls()
    batcher = Batcher(calls, run, max_batch=8, max_wait=0.05)
    tasks = [asyncio.create_task(batcher.call(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    async with asyncio.timeout(LIMIT):
        assert (await tasks[0], await tasks[2]) == (2, 6)
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert calls.batches == [[1, 3]]
    assert batcher.stats().cancelled == 1


@both_loops
async def test_a_caller_cancelled_during_its_job_loses_only_its_result(run: Run) -> None:
    gate = threading.Event()
    calls = Calls(gate=gate)
    batcher = Batcher(calls, run, max_batch=2, max_wait=0.01)
    leaving = asyncio.create_task(batcher.call(1))
    staying = asyncio.create_task(batcher.call(2))
    await until(lambda: len(calls.batches) == 1)  # the job runs on a thread
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    gate.set()
    async with asyncio.timeout(LIMIT):
        assert await staying == 4
        assert await batcher.call(3) == 6  # and the batcher goes on
    assert calls.batches == [[1, 2], [3]]


@both_loops
async def test_a_job_whose_callers_all_left_before_it_reached_a_thread_does_not_run(
    run: Run, pool: BoundedExecutor
) -> None:
    calls = Calls()
    batcher = Batcher(calls, run, max_batch=2, max_wait=0.0)
    busy = threading.Event()
    blockers = [pool.submit(busy.wait, LIMIT) for _ in range(pool.max_threads)]
    call = asyncio.create_task(batcher.call(1))
    # Both blockers on their threads and the job behind them: "one queued" alone can be
    # a blocker whose thread has not started yet, before the job was even submitted
    # (then the caller leaves before any job exists, and none is skipped).
    await until(lambda: pool.stats().active == pool.max_threads and pool.stats().queued == 1)
    assert batcher.stats().in_flight == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    busy.set()
    await until(lambda: batcher.stats().skipped_jobs == 1)
    assert calls.batches == []
    assert all(blocker.result(timeout=LIMIT) for blocker in blockers)
    await until(lambda: batcher.stats().in_flight == 0 and pool.stats().active == 0)


@pytest.mark.parametrize("max_jobs", [1, 2])
@both_loops
async def test_at_most_max_jobs_run_at_once(run: Run, max_jobs: int) -> None:
    gate = threading.Event()
    calls = Calls(gate=gate)
    batcher = Batcher(calls, run, max_batch=2, max_wait=0.0, max_jobs=max_jobs)
    tasks = [asyncio.create_task(batcher.call(i)) for i in range(8)]
    await until(lambda: len(calls.batches) == max_jobs)
    await asyncio.sleep(0.02)
    assert len(calls.batches) == max_jobs  # the others wait for a job to finish
    assert batcher.stats().in_flight == max_jobs
    gate.set()
    async with asyncio.timeout(LIMIT):
        assert await asyncio.gather(*tasks) == [2 * i for i in range(8)]
    assert calls.most_at_once <= max_jobs
    assert [len(batch) for batch in calls.batches] == [2, 2, 2, 2]


@both_loops
async def test_a_wrong_number_of_results_fails_the_callers(run: Run) -> None:
    batcher: Batcher[int, int] = Batcher(lambda items: [0], run, max_batch=2, max_wait=0.0)
    async with asyncio.timeout(LIMIT):
        outcomes = await asyncio.gather(
            batcher.call(1), batcher.call(2), batcher.call(3), return_exceptions=True
        )
    # The first two filled a batch (one result for two items: both fail); the third
    # left alone at the end of the event loop's turn (one result for one: right).
    assert all(
        isinstance(o, ValueError) and "1 results for 2 items" in str(o) for o in outcomes[:2]
    )
    assert outcomes[2] == 0


def test_bad_parameters_are_refused_with_their_name(run: Run) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(Calls(), run, max_batch=0, max_wait=0.0)
    with pytest.raises(ValueError, match="max_wait"):
        Batcher(Calls(), run, max_batch=1, max_wait=-1.0)
    with pytest.raises(ValueError, match="max_jobs"):
        Batcher(Calls(), run, max_batch=1, max_wait=0.0, max_jobs=0)
    with pytest.raises(ValueError, match="max_batch"):
        StepBatcher(Steps(), run, max_batch=0)
    with pytest.raises(ValueError, match="buffer"):
        StepBatcher(Steps(), run, max_batch=1, buffer=0)
