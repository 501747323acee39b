"""``local``: a small real language model on the CPU — a word-level n-gram model.

Trained when the engine is built, on the public-domain corpus shipped with the
package (the Gettysburg Address, the Preamble to the U.S. Constitution and the opening
of the Declaration of Independence) or on the ``corpus`` text in the model's
parameters. Sampling honours ``temperature`` (0: always the likeliest word), ``top_p``
and ``seed`` (the same seed gives the same text). Sampling runs on the shared pool in
batches; ``tokens_per_second`` paces the stream on the event loop, so a slow stream
holds no thread.

Parameters: ``order`` (2 to 5, default 3), ``corpus`` (text), ``tokens_per_second``
(0: as fast as possible).

Log-probabilities (``logprobs``) are the model's own: the log of a word's share of the
counts after the context the word was drawn from (the longest one the model knows),
before temperature and top_p; the alternatives are the most frequent words there.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from ..data.models import ModelConfig
from ..errors import EngineError
from .base import Candidate, Engine, EngineContext, GenerationRequest, Token
from .parameters import WHOLE, EngineParameters, parameters

__all__ = ["CORPUS", "LocalEngine", "LocalParameters", "NGramModel", "create"]

CORPUS = Path(__file__).with_name("corpus.txt")
_TOKEN = re.compile(r"[A-Za-z0-9'-]+|[.,;:!?]")
_BATCH = 16  # tokens sampled per pool job
# Only the prompt's last words matter; its tail is tokenised, not all of it (a 10 MB
# prompt would hold the event loop for most of a second).
_TAIL = 4096


class NGramModel:
    """Counts of the next word after each context of ``order - 1`` words."""

    def __init__(self, text: str, order: int) -> None:
        tokens = _TOKEN.findall(text)
        if len(tokens) < order + 1:
            raise EngineError(f"the corpus is too short for order {order}: {len(tokens)} tokens")
        self.order = order
        self.table: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
        for n in range(1, order):
            # Back-off tables for shorter contexts, so any prompt finds a continuation.
            for i in range(len(tokens) - n):
                self.table[tuple(tokens[i : i + n])][tokens[i + n]] += 1
        self.table[()] = Counter(tokens)
        self.starts = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "."]

    def next_word(
        self, context: list[str], rng: random.Random, temperature: float, top_p: float
    ) -> str:
        return self.draw(context, rng, temperature, top_p)[0]

    def draw(
        self, context: list[str], rng: random.Random, temperature: float, top_p: float
    ) -> tuple[str, list[tuple[str, int]]]:
        """The next word, and the counts it was drawn from, most frequent first."""
        for n in range(self.order - 1, -1, -1):
            counts = self.table.get(tuple(context[-n:]) if n else ())
            if counts:
                ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                return _sample(ranked, rng, temperature, top_p), ranked
        raise AssertionError("the unigram table is never empty")


def _sample(
    ranked: list[tuple[str, int]], rng: random.Random, temperature: float, top_p: float
) -> str:
    # ``ranked``: most frequent first, ties by word, so a seed gives the same words.
    if temperature == 0:
        return ranked[0][0]
    weights = [count ** (1.0 / temperature) for _, count in ranked]
    total = sum(weights)
    kept, cumulative = [], 0.0
    for (word, _), weight in zip(ranked, weights, strict=True):
        kept.append((word, weight))
        cumulative += weight / total
        if cumulative >= top_p:
            break
    return rng.choices([w for w, _ in kept], weights=[w for _, w in kept])[0]


def _last_words(prompt: str, count: int) -> list[str]:
    """The prompt's last ``count`` words. Only its tail is tokenised (a wider one while
    it holds too few words): a whole 10 MB prompt would hold the event loop for most
    of a second; the first word of a tail may be cut, so one more is read than kept."""
    window = _TAIL
    while True:
        words = _TOKEN.findall(prompt[-window:])
        if len(words) > count or window >= len(prompt):
            return words[-count:] if count else []
        window *= 4


def _join(word: str, first: bool) -> str:
    return word if first or word in ".,;:!?" else " " + word


class LocalEngine:
    """One n-gram model, trained once per process per model row."""

    def __init__(self, model: NGramModel, context: EngineContext, pace: float) -> None:
        self._model = model
        self._context = context
        self._pace = pace

    def count_tokens(self, text: str) -> int:
        return len(_TOKEN.findall(text))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        async with aclosing(self.generate_tokens(request)) as tokens:
            async for token in tokens:
                yield token.text

    async def generate_tokens(self, request: GenerationRequest) -> AsyncGenerator[Token, None]:
        rng = random.Random(request.seed)
        keep = self._model.order - 1
        history = _last_words(request.prompt, keep)
        if not history or tuple(history) not in self._model.table:
            history = [rng.choice(self._model.starts or ["The"])]
        produced = 0
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while produced < request.max_tokens:
            count = min(_BATCH, request.max_tokens - produced)
            tokens = await self._context.run_sync(
                self._sample, history, rng, request, count, produced == 0
            )
            for token in tokens:
                if self._pace:
                    next_at += 1.0 / self._pace
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
                yield token
                produced += 1

    def _sample(
        self,
        history: list[str],
        rng: random.Random,
        request: GenerationRequest,
        count: int,
        first: bool,
    ) -> list[Token]:
        tokens = []
        top = request.logprobs
        for i in range(count):
            word, ranked = self._model.draw(history, rng, request.temperature, request.top_p)
            text = _join(word, first and i == 0)
            if top is None:
                tokens.append(Token(text))
            else:
                total = sum(c for _, c in ranked)
                share = dict(ranked)[word] / total
                tokens.append(
                    Token(
                        text,
                        Candidate.of_text(text, math.log(share)),
                        tuple(
                            Candidate.of_text(_join(w, first and i == 0), math.log(c / total))
                            for w, c in ranked[:top]
                        ),
                    )
                )
            history.append(word)
            del history[: -(self._model.order - 1) or None]
        return tokens

    async def aclose(self) -> None:
        return None


def _read_corpus() -> str:
    return CORPUS.read_text(encoding="utf-8")


def _number(
    parameters: Mapping[str, Any], name: str, default: float, low: float, high: float
) -> float:
    value = parameters.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise EngineError(
            f"parameter {name!r} must be a number in [{low:g}, {high:g}], got {value!r}"
        )
    return float(value)


class LocalParameters(EngineParameters):
    """The ``local`` engine's parameters (checked when a model is written). A
    ``corpus`` has at least six words, enough for any ``order``."""

    order: Annotated[int, Field(ge=2, le=5), WHOLE] = 3
    corpus: (
        Annotated[str, Field(pattern=r"([A-Za-z0-9'-]+[^A-Za-z0-9'-]+){5}[A-Za-z0-9'-]")] | None
    ) = None
    tokens_per_second: Annotated[float, Field(ge=0, le=10_000)] = 0


@parameters(LocalParameters)
async def create(model: ModelConfig, context: EngineContext) -> Engine:
    """Build the engine for ``model`` (trains the n-gram model on the pool)."""
    parameters = model.parameters
    order = int(_number(parameters, "order", 3, 2, 5))
    pace = _number(parameters, "tokens_per_second", 0, 0, 10_000)
    corpus = parameters.get("corpus")
    if corpus is not None and not isinstance(corpus, str):
        raise EngineError("parameter 'corpus' must be text")
    text = corpus if corpus is not None else await context.run_sync(_read_corpus)
    trained = await context.run_sync(NGramModel, text, order)
    return LocalEngine(trained, context, pace)
