"""The neural engine: sampling rules, reproducibility, limits, embeddings, parameters,
a decoding step that stops for a joining stream."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from quart_service.data.models import ModelConfig
from quart_service.engines.base import EngineContext, GenerationRequest
from quart_service.engines.neural import create
from quart_service.engines.neural.engine import NO_TOKEN, NeuralEngine
from quart_service.engines.neural.random_weights import write_random_weights
from quart_service.engines.neural.sampling import Sampler
from quart_service.engines.neural.weights import GPT2Config
from quart_service.engines.registry import discover_factories
from quart_service.errors import EngineError

from .support.server import server_env

CONFIG = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=260, n_ctx=64)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("neural") / "engine.safetensors"
    write_random_weights(path, CONFIG, seed=11)
    return path


async def _run_sync(fn: Callable[..., Any], *args: Any) -> Any:
    # What the service lends: a thread for each blocking job (its pool, here asyncio's).
    return await asyncio.to_thread(partial(fn, *args))


async def _no_http() -> httpx.AsyncClient:
    raise AssertionError("the neural engine makes no HTTP calls")


CONTEXT = EngineContext(run_sync=_run_sync, http_client=_no_http)


def _row(parameters: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_mapping(
        {"name": "tiny-gpt2", "engine": "neural", "parameters": parameters, "enabled": True,
         "updated_at": "2026-01-01T00:00:00Z"}
    )  # fmt: skip


async def _engine(weights: Path, **parameters: Any) -> NeuralEngine:
    engine = await create(_row({"weights": str(weights), **parameters}), CONTEXT)
    assert isinstance(engine, NeuralEngine)
    return engine


async def _text(engine: NeuralEngine, **fields: Any) -> list[str]:
    request = GenerationRequest(**{"prompt": "We the People", "max_tokens": 24, **fields})
    return [piece async for piece in engine.generate(request)]


def test_the_entry_point_is_declared() -> None:
    """``pip install -e .`` after pulling: the installed metadata declares ``neural``."""
    assert "neural" in discover_factories()


async def test_temperature_zero_is_deterministic_and_greedy(weights_file: Path) -> None:
    engine = await _engine(weights_file)
    first = await _text(engine, temperature=0.0)
    assert len(first) == 24  # one piece per token, max_tokens of them
    assert first == await _text(engine, temperature=0.0, seed=99)  # the seed plays no part
    # Greedy: each token is the argmax of the model's logits after the ones before.
    ids = engine.tokenizer.encode("We the People")
    state = engine.model.new_state(ids)
    greedy = []
    for _ in range(24):
        token = int(engine.model.forward([state])[0][:256].argmax())
        greedy.append(token)
        state.feed(token)
    decoder = engine.tokenizer.decoder()
    expected = [decoder.feed(t) for t in greedy]
    expected[-1] += decoder.flush()
    assert first == expected


async def test_the_same_seed_gives_the_same_text(weights_file: Path) -> None:
    engine = await _engine(weights_file)
    texts = [await _text(engine, temperature=0.9, top_p=0.9, seed=s) for s in (1, 1, 2)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    assert "".join(texts[0]) == "".join(await _text(engine, temperature=0.9, top_p=0.9, seed=1))


async def test_concurrent_generations_keep_their_own_state(weights_file: Path) -> None:
    # Each steps by itself (max_batch 0), interleaved on the pool: a sampled stream's
    # draws then match exactly. In one batch, a row's last bits depend on which other
    # rows share its step (docs/engines.md), and a temperature draw that lands on a
    # boundary could then flip a token; temperature 0 is compared batched elsewhere.
    engine = await _engine(weights_file, max_batch=0)
    alone = [await _text(engine, temperature=0.8, seed=s) for s in range(4)]
    together = await asyncio.gather(*(_text(engine, temperature=0.8, seed=s) for s in range(4)))
    assert list(together) == alone


async def test_limits_of_a_generation(weights_file: Path) -> None:
    engine = await _engine(weights_file)
    assert len(await _text(engine, max_tokens=1)) == 1
    # An empty prompt starts from the tokenizer's start token.
    assert len(await _text(engine, prompt="", max_tokens=3)) == 3
    # A prompt longer than the context keeps its end; the context then ends the text.
    long = await _text(engine, prompt="x" * 500, max_tokens=200, temperature=0.0)
    assert 0 < len(long) < 200
    decoding = engine.start(GenerationRequest(prompt="x" * 500, max_tokens=200))
    assert decoding.state.pending == [ord("x")] * (CONFIG.n_ctx // 2)
    assert engine.count_tokens("naïve") == 6  # bytes


async def test_a_decoding_ends_at_the_end_of_text_token(weights_file: Path) -> None:
    engine = await _engine(weights_file)
    decoding = engine.start(GenerationRequest(prompt="a", max_tokens=5))
    decoding.eos_id = 7
    assert decoding.accept(7) is None
    assert decoding.finished
    decoding = engine.start(GenerationRequest(prompt="a", max_tokens=5))
    decoding.finished = True
    assert decoding.state.finished


async def test_steps_batch_several_decodings(weights_file: Path) -> None:
    engine = await _engine(weights_file)
    requests = [GenerationRequest(prompt=p, max_tokens=6, temperature=0.0) for p in "abc"]
    alone = []
    for request in requests:
        decoding = engine.start(request)
        alone.append([engine.step([decoding])[0] for _ in range(6)])
        assert decoding.finished
    decodings = [engine.start(r) for r in requests]
    together = [engine.step(decodings) for _ in range(6)]
    assert [list(column) for column in zip(*together, strict=True)] == alone


async def test_a_long_prompt_joins_in_chunks_and_the_others_step_on(weights_file: Path) -> None:
    """With ``prefill_chunk`` 8, a 20-token prompt joining two decoding streams is fed
    over three steps: the two get a token at every one of them, the newcomer gets
    NO_TOKEN until its prompt is whole, and then the tokens it gets alone."""
    engine = await _engine(weights_file, prefill_chunk=8, prompts_first=False)
    request = GenerationRequest(prompt="a prompt of twenty b", max_tokens=4, temperature=0.0)
    alone = engine.start(request)
    expected = [engine.step([alone])[0] for _ in range(6)]
    assert expected[:2] == [NO_TOKEN, NO_TOKEN]  # 8 + 8 + 4 tokens: three steps
    running = [engine.start(GenerationRequest(prompt=p, max_tokens=8)) for p in "xy"]
    engine.step(running)
    joining = engine.start(request)
    outputs = [engine.step([*running, joining]) for _ in range(6)]
    assert all(o[0] != NO_TOKEN and o[1] != NO_TOKEN for o in outputs)
    assert [o[2] for o in outputs] == expected
    whole = await _engine(weights_file, prefill_chunk=0)
    decoding = whole.start(request)
    assert [whole.step([decoding])[0] for _ in range(4)] == expected[2:]


async def test_prompts_first_gives_a_joining_stream_a_step_of_its_own(weights_file: Path) -> None:
    engine = await _engine(weights_file, prompts_first=True)
    running = [engine.start(GenerationRequest(prompt=p, max_tokens=8)) for p in "xy"]
    first = engine.step(running)
    assert NO_TOKEN not in first
    request = GenerationRequest(prompt="joining", max_tokens=3, temperature=0.0)
    alone = engine.start(request)
    expected = [engine.step([alone])[0] for _ in range(3)]
    joining = engine.start(request)
    outputs = [engine.step([*running, joining]) for _ in range(3)]
    # Its prompt's step is its own: the two sit it out, then all step together.
    assert outputs[0][:2] == [NO_TOKEN, NO_TOKEN]
    assert all(NO_TOKEN not in o for o in outputs[1:])
    assert [o[2] for o in outputs] == expected


async def test_decode_batch_feeds_the_decodings_that_waited_longest(weights_file: Path) -> None:
    """With ``decode_batch`` 2, five decoding streams take turns, two a step, those fed
    least recently first; each still gets the tokens it gets alone."""
    engine = await _engine(weights_file, decode_batch=2)
    requests = [GenerationRequest(prompt=p, max_tokens=4, temperature=0.0) for p in "abcde"]
    alone = []
    for request in requests:
        decoding = engine.start(request)
        alone.append([engine.step([decoding])[0] for _ in range(4)])
    decodings = [engine.start(r) for r in requests]
    first = engine.step(decodings)  # the prompts: all in one step
    assert NO_TOKEN not in first
    fed = []
    outputs = [first]
    while not all(d.finished for d in decodings):
        active = [d for d in decodings if not d.finished]
        step = engine.step(active)
        assert sum(t != NO_TOKEN for t in step) == min(2, len(active))
        fed.append([decodings.index(d) for d, t in zip(active, step, strict=True) if t != NO_TOKEN])
        outputs.append([step[active.index(d)] if d in active else NO_TOKEN for d in decodings])
    assert fed[:3] == [[0, 1], [2, 3], [0, 4]]
    got = [[o[i] for o in outputs if o[i] != NO_TOKEN] for i in range(len(requests))]
    assert got == alone


async def test_embeddings(weights_file: Path) -> None:
    engine = await _engine(weights_file)
    vectors = await CONTEXT.run_sync(
        engine.embed_now, ["We the People", "", "of the United States"]
    )
    assert len(vectors) == 3
    assert all(len(v) == CONFIG.n_embd for v in vectors)
    assert all(abs(float(np.linalg.norm(v)) - 1.0) < 1e-5 for v in vectors)
    again = await CONTEXT.run_sync(engine.embed_now, ["We the People"])
    np.testing.assert_allclose(again[0], vectors[0], atol=1e-5)
    # Concurrent requests through the engine's batcher: each gets its own vectors.
    texts = [["We the People"], ["of the United States", "We the People"], [""]]
    answers = await asyncio.gather(*(engine.embed(t) for t in texts))
    np.testing.assert_allclose(answers[0][0], vectors[0], atol=1e-5)
    np.testing.assert_allclose(answers[1][0], vectors[2], atol=1e-5)
    np.testing.assert_allclose(answers[1][1], vectors[0], atol=1e-5)
    np.testing.assert_allclose(answers[2][0], vectors[1], atol=1e-5)
    stats = engine.stats()["embeddings"]
    assert stats["items"] == 4
    assert stats["jobs"] < 4
    await engine.aclose()


async def test_pace(weights_file: Path) -> None:
    engine = await _engine(weights_file, tokens_per_second=200)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert len(await _text(engine, max_tokens=10)) == 10
    assert loop.time() - started >= 10 / 200 * 0.9


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({}, "'weights'"),
        ({"weights": "/nonexistent/model.safetensors"}, "cannot read"),
        ({"load": "stream"}, "'load'"),
        ({"tokenizer": 5}, "'tokenizer'"),
        ({"tokens_per_second": -1}, "tokens_per_second"),
        ({"prefill_chunk": -1}, "prefill_chunk"),
        ({"prompts_first": "yes"}, "prompts_first"),
    ],
)
async def test_bad_parameters_are_named(
    weights_file: Path, parameters: dict[str, Any], message: str
) -> None:
    row = _row({"weights": str(weights_file), **parameters} if parameters else {})
    with pytest.raises(EngineError, match=message):
        await create(row, CONTEXT)


async def test_the_byte_tokenizer_needs_256_ids(tmp_path: Path) -> None:
    path = tmp_path / "narrow.safetensors"
    write_random_weights(path, GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=100, n_ctx=8))
    with pytest.raises(EngineError, match="at least 256"):
        await _engine(path)


def test_sampling_rules() -> None:
    logits = np.array([0.0, 3.0, 2.9, -5.0], dtype=np.float32)
    assert Sampler(0.0, 1.0, None, 4).sample(logits) == 1
    assert Sampler(0.0, 1.0, None, 1).sample(logits) == 0  # only ids the tokenizer decodes
    # top_p small: only the likeliest token is left.
    assert {Sampler(1.0, 0.01, s, 4).sample(logits) for s in range(20)} == {1}
    # top_p 0.9: the two close tokens, never the tail.
    drawn = {Sampler(1.0, 0.9, s, 4).sample(logits) for s in range(200)}
    assert drawn == {1, 2}
    # A high temperature reaches every token.
    assert {Sampler(50.0, 1.0, s, 4).sample(logits) for s in range(200)} == {0, 1, 2, 3}


def test_without_numpy_the_entry_point_loads_and_says_what_to_install() -> None:
    script = """
import asyncio, sys
sys.modules["numpy"] = None  # as if numpy were not installed
from quart_service.engines.neural import create
from quart_service.errors import EngineError
try:
    asyncio.run(create(None, None))
except EngineError as exc:
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], env=server_env(), capture_output=True, text=True, timeout=60
    )
    assert "pip install 'quart_service[neural]'" in result.stdout, result.stderr


async def test_logprobs_follow_the_tokens_through_prompt_chunks(weights_file: Path) -> None:
    """Log-probabilities are recorded only in steps that sample a token (not in the
    steps that feed a long prompt chunk by chunk), so each token gets its own."""
    engine = await _engine(weights_file, prefill_chunk=16)
    prompt = "We the People of the United States, in Order to form a more perfect Union"
    plain = await _text(engine, prompt=prompt, temperature=0.0, max_tokens=12)
    request = GenerationRequest(prompt=prompt, max_tokens=12, temperature=0.0, logprobs=3)
    tokens = [token async for token in engine.generate_tokens(request)]
    assert [t.text for t in tokens] == plain
    for token in tokens:
        assert token.sampled is not None
        assert len(token.top) == 3
        # Greedy: the token written is the likeliest, with the largest log-probability.
        assert token.top[0].token == token.sampled.token
        assert token.top[0].logprob == pytest.approx(token.sampled.logprob)
        assert token.top[0].logprob >= token.top[1].logprob >= token.top[2].logprob
        assert token.sampled.logprob <= 0


class _Lender:
    """An engine's ``run_sync`` that lends a thread to each job, as :data:`CONTEXT`
    does, and before the job numbered n (counting from ``jobs = 0``) awaits
    ``before[n]()`` on the event loop: for a step, once its batch is formed and before
    its thread starts, which is where a stream can join or leave while it runs."""

    def __init__(self) -> None:
        self.jobs = 0
        self.before: dict[int, Callable[[], Awaitable[None]]] = {}

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.jobs += 1
        hook = self.before.pop(self.jobs, None)
        if hook is not None:
            await hook()
        return await asyncio.to_thread(partial(fn, *args))


async def _until(condition: Callable[[], bool]) -> None:
    """Let the event loop turn until ``condition()`` holds (a task's first steps)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


# Three streams decoding, and one that joins them: (prompt, max_tokens).
JOINING = {"A": ("We the", 6), "B": ("People of", 6), "C": ("the United", 6), "N": ("States", 4)}


async def _stopping_engine(weights: Path) -> tuple[NeuralEngine, _Lender, dict[str, list[str]]]:
    """An engine on a :class:`_Lender`, and the text each of :data:`JOINING` gets alone
    (temperature 0)."""
    alone = await _engine(weights)
    expected = {
        name: await _text(alone, prompt=prompt, max_tokens=n, temperature=0.0)
        for name, (prompt, n) in JOINING.items()
    }
    lender = _Lender()
    engine = await create(_row({"weights": str(weights)}), EngineContext(lender.run_sync, _no_http))
    assert isinstance(engine, NeuralEngine)
    lender.jobs = 0  # the next job is the first step
    return engine, lender, expected


async def _read(engine: NeuralEngine, name: str, arrivals: list[tuple[str, str]]) -> None:
    prompt, max_tokens = JOINING[name]
    request = GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0)
    async for piece in engine.generate(request):
        arrivals.append((name, piece))


def _joiner(
    engine: NeuralEngine, readers: dict[str, asyncio.Task[None]], arrivals: list[tuple[str, str]]
) -> Callable[[], Awaitable[None]]:
    """A hook that starts stream N and returns once it waits for a slot."""

    async def join() -> None:
        readers["N"] = asyncio.create_task(_read(engine, "N", arrivals))
        await _until(lambda: engine.stats()["steps"]["waiting"] == 1)

    return join


async def _finished(readers: dict[str, asyncio.Task[None]]) -> None:
    """Wait for A, B and C, then for N (it starts while they run); bounded, in case a
    stream never gets its tokens."""
    await asyncio.wait_for(asyncio.wait(list(readers.values())), timeout=60)
    await asyncio.wait_for(asyncio.wait([readers["N"]]), timeout=60)


async def test_a_decoding_step_stops_for_a_joining_stream(weights_file: Path) -> None:
    """A, B and C decode; N arrives while their second step runs (after its batch
    was formed). That step stops after its first layer and gives them no token; N's
    prompt has the next step to itself, so N's first token arrives before A's, B's
    and C's second; the step after that ends the stopped pass. Each stream gets the
    tokens it gets alone."""
    engine, lender, expected = await _stopping_engine(weights_file)
    arrivals: list[tuple[str, str]] = []
    readers: dict[str, asyncio.Task[None]] = {}
    # Step 1 feeds the three prompts (they join together); step 2 decodes only.
    lender.before[2] = _joiner(engine, readers, arrivals)
    readers.update({name: asyncio.create_task(_read(engine, name, arrivals)) for name in "ABC"})
    await _finished(readers)
    assert all(task.result() is None for task in readers.values())
    # Arrivals follow the steps: a step's readers are woken before the next step's
    # thread can hand its outputs back (the loop's ready queue is first in, first out).
    names = [name for name, _ in arrivals]
    assert (set(names[:3]), names[3], set(names[4:7])) == ({"A", "B", "C"}, "N", {"A", "B", "C"})
    got = {name: [piece for n, piece in arrivals if n == name] for name in JOINING}
    assert got == expected
    assert (engine.stats()["decode_stops"], engine.stats()["dropped_passes"]) == (1, 0)


async def test_a_stream_leaving_drops_the_stopped_pass(weights_file: Path) -> None:
    """As above, and C's client goes away while the pass is stopped (before the next
    step reaches a thread): the pass is dropped, not ended, and A and B, whose states
    it left as they were, get their second token from a fresh pass after N's prompt
    step: the tokens each gets alone. C got its first token only."""
    engine, lender, expected = await _stopping_engine(weights_file)
    arrivals: list[tuple[str, str]] = []
    readers: dict[str, asyncio.Task[None]] = {}

    async def leave() -> None:
        readers["C"].cancel()
        await _until(lambda: engine.stats()["steps"]["left_early"] == 1)

    lender.before[2] = _joiner(engine, readers, arrivals)
    lender.before[3] = leave
    readers.update({name: asyncio.create_task(_read(engine, name, arrivals)) for name in "ABC"})
    await _finished(readers)
    assert readers["C"].cancelled()
    assert all(readers[name].result() is None for name in "ABN")
    names = [name for name, _ in arrivals]
    # Step 4, a fresh pass: A's and B's second token, N's second.
    assert (set(names[:3]), names[3], set(names[4:7])) == ({"A", "B", "C"}, "N", {"A", "B", "N"})
    got = {name: [piece for n, piece in arrivals if n == name] for name in JOINING}
    assert got == {**expected, "C": expected["C"][:1]}
    assert (engine.stats()["decode_stops"], engine.stats()["dropped_passes"]) == (1, 1)
