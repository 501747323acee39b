"""``neural``: GPT-2 on numpy, its weights memory-mapped and shared by every worker.

Parameters (the model row's):

- ``weights`` (required): path of a GPT-2 ``.safetensors`` file (absolute, or relative
  to the directory the server runs in).
- ``tokenizer``: ``bytes`` (ids 0..255 are bytes), ``gpt2-bytes`` (GPT-2's byte tokens),
  or the path of a ``tokenizer.json`` (needs the ``tokenizers`` package). Default: the
  file's metadata says (``bytes`` for :mod:`.random_weights` files), else
  ``gpt2-bytes``.
- ``tokens_per_second``: pace the stream (0, the default: as fast as it computes).
- ``load``: ``mmap`` (default: shared by every process on the host) or ``copy`` (a
  private copy per process: for a file that may be rewritten in place, and for the
  bench that shows what sharing saves).
- ``max_batch``: streams decoded together in one step (default 32); ``0`` steps each
  stream alone (one pool job per token each: the unbatched baseline).
- ``embed_batch``: texts embedded together in one job (default 64); ``0`` embeds each
  request's texts alone.
- ``prefill_chunk``: prompt tokens fed per step, over all the streams that join it
  (default 256); a longer prompt, or many prompts at once, are fed over several steps,
  so one step never holds the streams already decoding for long. ``0``: every prompt
  whole in the step it joins.
- ``prompts_first``: a step that has prompts to feed feeds only them (the streams
  already decoding sit it out), so a joining stream's first token waits for its own
  prompt, not for every other stream's next token too (default true; false: prompts
  join the decoding streams' step).
- ``decode_batch``: at most this many decoding streams are fed per step, those fed
  least recently first; the others sit it out with ``NO_TOKEN`` (default 0: every
  decoding stream in every step). A step then lasts about as long as that many
  streams' tokens take, so a joining stream waits for a short step before its
  prompt's: time to first token falls, and so does throughput (smaller matrix
  products read every weight more often; docs/benchmarks.md, "Batched decoding").

A decoding step (no prompt in it) stops between two layers when a stream waits to join
and has a slot (:meth:`~quart_service.batching.StepBatcher.joinable`): its streams get
``NO_TOKEN``, the next step feeds the newcomer's prompt, the one after finishes the
stopped pass (:class:`~.model.ForwardPass`). The newcomer waits for one layer, not a
whole step; nothing is computed twice.

Log-probabilities (``logprobs``) are the model's own: a log-softmax of the logits,
before temperature and top_p, computed in the step (on the pool) only for the
generations that ask.

A generation is a :class:`Decoding`; :meth:`NeuralEngine.step` advances a batch of
them by one token (the first step feeds the prompt), on the worker's pool. Streams
share steps through a :class:`~quart_service.batching.StepBatcher` (continuous
batching: a stream joins and leaves between steps), embeddings share jobs through a
:class:`~quart_service.batching.Batcher`.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ...batching import Batcher, StepBatcher
from ...data.models import ModelConfig
from ...errors import EngineError
from ..base import Candidate, Engine, EngineContext, GenerationRequest, Token
from .model import DecodeState, GPT2Model
from .sampling import Sampler, log_probabilities
from .tokenizer import ByteTokenizer, JsonTokenizer, Tokenizer

__all__ = ["NO_TOKEN", "Decoding", "NeuralEngine", "create", "load_tokenizer"]

NO_TOKEN = -1
"""A step's output for a stream that got no token from it: its prompt is not fed whole
yet, or it sat the step out: while prompts were fed (``prompts_first``), or while other
decoding streams had their turn (``decode_batch``)."""


class Decoding:
    """One request's generation: the model's state, its sampler and token budget."""

    __slots__ = (
        "eos_id",
        "fed_at",
        "logprobs",
        "n_ctx",
        "records",
        "remaining",
        "sampler",
        "state",
    )

    def __init__(
        self,
        state: DecodeState,
        sampler: Sampler,
        max_tokens: int,
        eos_id: int | None,
        n_ctx: int,
        logprobs: int | None = None,
    ) -> None:
        self.state = state
        self.sampler = sampler
        self.remaining = max_tokens
        self.eos_id = eos_id
        self.n_ctx = n_ctx
        # Alternatives wanted (None: no log-probabilities). The step appends one record
        # per sampled token on the pool's thread; the stream pops them in order (the
        # batcher may run steps ahead of the reader, so one slot would not do).
        self.logprobs = logprobs
        self.records: deque[tuple[float, list[tuple[int, float]]]] = deque()
        # The engine's step count when it was last fed: with ``decode_batch``, the
        # decodings fed least recently go first.
        self.fed_at = 0
        if max_tokens < 1:
            state.finished = True

    @property
    def finished(self) -> bool:
        """No more steps: max_tokens reached, end of text, or the context is full."""
        return self.state.finished

    @finished.setter
    def finished(self, value: bool) -> None:
        self.state.finished = value

    def accept(self, token_id: int) -> int | None:
        """Take the sampled token: the token to emit, or None at the end of text."""
        if token_id == self.eos_id:
            self.state.finished = True
            return None
        self.remaining -= 1
        if self.remaining <= 0 or self.state.length >= self.n_ctx:
            self.state.finished = True
        else:
            self.state.feed(token_id)
        return token_id


class NeuralEngine:
    """A GPT-2 model and its tokenizer, one instance per model row per worker."""

    def __init__(
        self,
        model: GPT2Model,
        tokenizer: Tokenizer,
        context: EngineContext,
        pace: float,
        max_batch: int = 32,
        embed_batch: int = 64,
        prefill_chunk: int = 256,
        prompts_first: bool = True,
        decode_batch: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.dimensions = model.config.n_embd
        self._context = context
        self._pace = pace
        self._prefill_chunk = prefill_chunk
        self._prompts_first = prompts_first
        self._decode_batch = decode_batch
        # A decoding step's pass stopped between two layers for a joining stream's
        # prompt: it goes on at the next step without prompts.
        self._stopped: _DecodingPass | None = None
        self._decode_stops = self._dropped_passes = 0
        self._step_count = 0
        self._vocab_limit = min(tokenizer.vocab_size, model.config.vocab_size)
        run = context.run_sync
        self._steps: StepBatcher[Decoding, int | None] | None = (
            StepBatcher(self.step, run, max_batch=max_batch, empty=NO_TOKEN) if max_batch else None
        )
        # No added wait: while one job runs the next batch fills by itself.
        self._embeds: Batcher[str, list[float]] | None = (
            Batcher(self.embed_now, run, max_batch=embed_batch, max_wait=0.0)
            if embed_batch
            else None
        )

    def stats(self) -> dict[str, Any]:
        """The batchers' counters (``/debug/identity``, the benchmarks), and how often a
        decoding step stopped for a joining stream (``decode_stops``) and a stopped
        pass was dropped, not ended, because one of its streams left or sat steps out
        (``dropped_passes``)."""
        return {
            "steps": asdict(self._steps.stats()) if self._steps is not None else None,
            "embeddings": asdict(self._embeds.stats()) if self._embeds is not None else None,
            "decode_stops": self._decode_stops,
            "dropped_passes": self._dropped_passes,
        }

    def count_tokens(self, text: str) -> int:
        if isinstance(self.tokenizer, ByteTokenizer):
            return len(text.encode("utf-8"))  # one token a byte: no list of ids needed
        return len(self.tokenizer.encode(text))

    def start(self, request: GenerationRequest) -> Decoding:
        """A new generation for ``request``. A prompt longer than the context keeps its
        end: as much as leaves room for max_tokens, at least half the context."""
        config = self.model.config
        keep = config.n_ctx - min(request.max_tokens - 1, config.n_ctx // 2)
        ids = self._last_ids(request.prompt, keep) or [self.tokenizer.bos_id]
        state = self.model.new_state(ids)
        sampler = Sampler(request.temperature, request.top_p, request.seed, self._vocab_limit)
        return Decoding(
            state,
            sampler,
            request.max_tokens,
            self.tokenizer.eos_id,
            config.n_ctx,
            request.logprobs,
        )

    def _last_ids(self, prompt: str, keep: int) -> list[int]:
        """The ids of the prompt's last ``keep`` tokens. Only a tail of the prompt is
        encoded (wider while it holds too few tokens): the whole of a 10 MB prompt would
        hold the event loop, and all but its end is cut anyway. The tail's first token
        may be cut in two, so one more is read than kept."""
        window = 8 * keep
        while True:
            ids = self.tokenizer.encode(prompt[-window:])
            if len(ids) > keep or window >= len(prompt):
                return ids[-keep:]
            window *= 4

    def step(self, decodings: Sequence[Decoding]) -> list[int | None]:
        """One forward pass for all of ``decodings`` together, then a token sampled for
        each: its id, None where the model ended the text, or :data:`NO_TOKEN` where
        it got none from this step. Blocking: run it on the pool."""
        stopped = self._stopped
        if stopped is not None and not stopped.still_whole(decodings):
            stopped = self._stopped = None  # one of its streams left or sits steps out
            self._dropped_passes += 1
        # The decodings fed this step, each with how many of its tokens, in batch order.
        feeds = [(d, n) for d, n in zip(decodings, self._feed_counts(decodings), strict=True) if n]
        if self._steps is not None and feeds and all(_decodes(d) for d, _ in feeds):
            # Decoding only: the stopped pass goes on, or a new one starts. Either stops
            # between two layers for a stream that can join, so that its prompt waits
            # for one layer of this step, not all of them.
            pass_ = stopped or _DecodingPass(self.model, [d for d, _ in feeds])
            logits = pass_.run(self._joinable)
            self._stopped = pass_ if logits is None else None
            if logits is None:
                self._decode_stops += 1
                return [NO_TOKEN] * len(decodings)
            fed = pass_.decodings
        else:
            # Prompts (and, unless prompts_first, decodings), or no batcher (nobody
            # joins, and each stream's steps run on their own): a pass that does not
            # stop. A stopped pass's decodings sit it out.
            if stopped is not None:
                feeds = stopped.others(feeds)
            fed = [d for d, _ in feeds]
            logits = self.model.forward([d.state for d in fed], [n for _, n in feeds])
        return self._sample(decodings, fed, logits)

    def _sample(
        self,
        decodings: Sequence[Decoding],
        fed: Sequence[Decoding],
        logits: npt.NDArray[np.float32],
    ) -> list[int | None]:
        """A token for each of ``decodings`` from its row of ``logits`` (one per
        decoding of ``fed``, in order); :data:`NO_TOKEN` for one not fed, or whose
        prompt is not all fed yet."""
        rows = {id(d): row for d, row in zip(fed, logits, strict=True)}
        tokens: list[int | None] = []
        for decoding in decodings:
            row = rows.get(id(decoding))
            if row is None or decoding.state.pending:
                tokens.append(NO_TOKEN)
            else:
                token = decoding.sampler.sample(row)
                if decoding.logprobs is not None:
                    decoding.records.append(
                        log_probabilities(row[: self._vocab_limit], token, decoding.logprobs)
                    )
                tokens.append(decoding.accept(token))
        return tokens

    def _joinable(self) -> bool:
        """A stream waits to join the batch and has a slot (read on the pool's thread: a
        stale answer costs one layer of waiting or one early stop)."""
        return self._steps is not None and self._steps.joinable()

    def _feed_counts(self, decodings: Sequence[Decoding]) -> list[int]:
        """Tokens each state is fed this step: a decoding state its one token; prompts,
        first come first fed, share ``prefill_chunk`` (the first always gets some, so
        every step makes progress; the others may get none and wait a step)."""
        is_decoding = [_decodes(d) for d in decodings]
        # prompts_first: while any prompt is fed, the decoding states wait.
        decode_feed = 0 if self._prompts_first and not all(is_decoding) else 1
        self._step_count += 1
        fed = set()
        if decode_feed:
            waiting = [i for i, decodes in enumerate(is_decoding) if decodes]
            if self._decode_batch and len(waiting) > self._decode_batch:
                # Those fed least recently first (a stable sort: then in batch order).
                waiting.sort(key=lambda i: decodings[i].fed_at)
                del waiting[self._decode_batch :]
            fed.update(waiting)
        budget = self._prefill_chunk or sys.maxsize
        counts = []
        for i, (decoding, decodes) in enumerate(zip(decodings, is_decoding, strict=True)):
            if decodes:
                if i in fed:
                    decoding.fed_at = self._step_count
                    counts.append(1)
                else:
                    counts.append(0)
                continue
            take = min(len(decoding.state.pending), budget)
            budget -= take
            counts.append(take)
        return counts

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        async with aclosing(self.generate_tokens(request)) as tokens:
            async for token in tokens:
                yield token.text

    async def generate_tokens(self, request: GenerationRequest) -> AsyncGenerator[Token, None]:
        decoding = self.start(request)
        decoder = self.tokenizer.decoder()
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        tokens = self._tokens(decoding)
        try:
            async for token in tokens:
                if token is None:
                    break
                if token == NO_TOKEN:
                    continue
                piece = decoder.feed(token)
                if decoding.finished:
                    piece += decoder.flush()
                if self._pace:
                    next_at += 1.0 / self._pace
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
                if decoding.logprobs is None:
                    yield Token(piece)
                else:
                    logprob, top = decoding.records.popleft()
                    yield Token(
                        piece,
                        self._candidate(token, logprob),
                        tuple(self._candidate(i, lp) for i, lp in top),
                    )
        finally:
            # Leave the batch now (a client gone, a timeout), not when collected.
            await tokens.aclose()

    def _candidate(self, token_id: int, logprob: float) -> Candidate:
        raw = self.tokenizer.token_bytes(token_id)
        return Candidate(raw.decode("utf-8", errors="replace"), logprob, tuple(raw))

    async def _tokens(self, decoding: Decoding) -> AsyncGenerator[int | None, None]:
        """The decoding's tokens: from the shared steps, or one pool job each."""
        if self._steps is not None:
            async for token in self._steps.stream(decoding):
                yield token
            return
        while not decoding.finished:
            (token,) = await self._context.run_sync(self.step, (decoding,))
            yield token

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector per text, grouped with other requests' texts into one job."""
        if self._embeds is None:
            vectors: list[list[float]] = await self._context.run_sync(self.embed_now, texts)
            return vectors
        embeds = self._embeds
        return list(await asyncio.gather(*(embeds.call(text) for text in texts)))

    def embed_now(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector per text (mean-pooled final hidden states). Blocking: run it
        on the pool."""
        batch = [self.tokenizer.encode(text) or [self.tokenizer.bos_id] for text in texts]
        vectors: list[list[float]] = self.model.embed(batch).tolist()
        return vectors

    async def aclose(self) -> None:
        # Nothing to release by hand: the mapping goes when the last array over it
        # does (a step still running on the pool keeps it until it ends).
        return None


class _DecodingPass:
    """A decoding step's forward pass, which may stop between two layers for a joining
    stream's prompt, and the decodings it feeds.

    Stopped, it goes on at a later step with no prompt in it; its decodings sit out
    the prompts' steps in between. It goes on only with every one of its decodings in
    the step: one that left or sits steps out (its consumer behind) drops it. Nothing
    of a pass counts until it ends (the states' lengths), so a dropped pass leaves its
    states as they were, and nothing is computed twice."""

    __slots__ = ("_members", "_pass", "decodings")

    def __init__(self, model: GPT2Model, decodings: list[Decoding]) -> None:
        # Each fed its one pending token (the one sampled last).
        self._pass = model.start([d.state for d in decodings])
        self.decodings = decodings
        self._members = frozenset(decodings)

    def run(self, stop: Callable[[], bool]) -> npt.NDArray[np.float32] | None:
        """Go on through the layers: the logits, one row per decoding, or None where
        ``stop()`` said so between two layers (at least one layer is computed)."""
        return self._pass.run(stop)

    def still_whole(self, decodings: Sequence[Decoding]) -> bool:
        """Every decoding this pass feeds is among ``decodings``."""
        return self._members.issubset(decodings)

    def others(self, feeds: list[tuple[Decoding, int]]) -> list[tuple[Decoding, int]]:
        """The decodings of ``feeds`` (with their token counts) that are not this
        pass's: its own sit out a prompts' step and wait for it to go on."""
        return [(d, n) for d, n in feeds if d not in self._members]


def _decodes(decoding: Decoding) -> bool:
    """Past its prompt, with one token pending (the one sampled last)."""
    return len(decoding.state.pending) == 1 and decoding.state.length > 0


def load_tokenizer(spec: str | None, metadata: Mapping[str, str]) -> Tokenizer:
    """The tokenizer named by the ``tokenizer`` parameter, or the weights' default."""
    spec = spec or metadata.get("tokenizer") or "gpt2-bytes"
    if spec == "bytes":
        return ByteTokenizer("identity")
    if spec == "gpt2-bytes":
        return ByteTokenizer("gpt2")
    if spec.endswith(".json"):
        return JsonTokenizer(Path(spec))
    raise EngineError(
        f"parameter 'tokenizer' must be 'bytes', 'gpt2-bytes' or a tokenizer.json path, "
        f"got {spec!r}"
    )


def _build(parameters: Mapping[str, Any]) -> tuple[GPT2Model, Tokenizer]:
    weights = parameters.get("weights")
    if not isinstance(weights, str) or not weights:
        raise EngineError("parameter 'weights' must be the path of a .safetensors file")
    load = parameters.get("load", "mmap")
    if load not in ("mmap", "copy"):
        raise EngineError(f"parameter 'load' must be 'mmap' or 'copy', got {load!r}")
    spec = parameters.get("tokenizer")
    if spec is not None and not isinstance(spec, str):
        raise EngineError("parameter 'tokenizer' must be text")
    model = GPT2Model.load(Path(weights), copy=load == "copy")
    tokenizer = load_tokenizer(spec, model.weights.metadata)
    if tokenizer.vocab_size > model.config.vocab_size and isinstance(tokenizer, ByteTokenizer):
        raise EngineError(
            f"the byte tokenizer needs a vocabulary of at least 256; {weights} has "
            f"{model.config.vocab_size}"
        )
    return model, tokenizer


def _pace(parameters: Mapping[str, Any]) -> float:
    value = parameters.get("tokens_per_second", 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 10_000:
        raise EngineError(f"parameter 'tokens_per_second' must be in [0, 10000], got {value!r}")
    return float(value)


async def create(model: ModelConfig, context: EngineContext) -> Engine:
    """Build the engine for ``model``: map its weights (on the pool) and its tokenizer."""
    parameters = model.parameters
    pace = _pace(parameters)
    max_batch = _count(parameters, "max_batch", 32)
    embed_batch = _count(parameters, "embed_batch", 64)
    prefill_chunk = _count(parameters, "prefill_chunk", 256)
    decode_batch = _count(parameters, "decode_batch", 0)
    prompts_first = parameters.get("prompts_first", True)
    if not isinstance(prompts_first, bool):
        raise EngineError(f"parameter 'prompts_first' must be true or false, got {prompts_first!r}")
    gpt2, tokenizer = await context.run_sync(_build, parameters)
    return NeuralEngine(
        gpt2,
        tokenizer,
        context,
        pace,
        max_batch,
        embed_batch,
        prefill_chunk,
        prompts_first,
        decode_batch,
    )


def _count(parameters: Mapping[str, Any], name: str, default: int) -> int:
    value = parameters.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4096:
        raise EngineError(f"parameter '{name}' must be an integer in [0, 4096], got {value!r}")
    return value
