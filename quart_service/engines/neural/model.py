"""GPT-2 in numpy, float32: a forward pass over many sequences at once, with KV caches.

The architecture is GPT-2's: token + position embeddings; blocks of pre-LN causal
multi-head attention and a GELU (tanh approximation) MLP, each added to the residual
stream; a final layer norm; the LM head tied to the token embeddings.

:meth:`GPT2Model.forward` takes several :class:`DecodeState`\\ s and feeds each its
pending tokens (its whole prompt the first time, then the one token sampled last).
Every token of every state goes through the projections and the MLP together, as one
``[N, d] @ W`` product per weight matrix: the weights are read from memory once per
step, whatever the number of sequences, which is what makes a batch cost little more
than one sequence. Attention runs per state, over its own KV cache (sequences have
different lengths). Only each state's last position goes through the LM head.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import overload

import numpy as np
import numpy.typing as npt

from ...errors import EngineError
from .weights import GPT2Config, GPT2Weights, load_weights

__all__ = ["DecodeState", "ForwardPass", "GPT2Model"]

_Array = npt.NDArray[np.float32]
# A pass's end: the residual stream of all its tokens, [N, d], and where each state's
# rows end.
_Hidden = tuple[_Array, npt.NDArray[np.intp]]

_GELU_C = np.float32(np.sqrt(2.0 / np.pi))
_GELU_K = np.float32(0.044715)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_FIRST_CAPACITY = 64  # cache positions allocated first; doubled as the sequence grows


class DecodeState:
    """One sequence: its KV cache and the tokens still to feed.

    ``pending`` is what the next :meth:`GPT2Model.forward` feeds; ``length`` is how
    many positions the cache holds. ``finished`` is set by the engine's sampler
    (max_tokens, end of text, a full context); the model never feeds a finished
    state's tokens on its own initiative."""

    __slots__ = ("_keys", "_values", "finished", "length", "pending")

    def __init__(self, prompt_ids: Sequence[int]) -> None:
        self.pending: list[int] = list(prompt_ids)
        self.length = 0
        self.finished = False
        # Per layer: [heads, capacity, head_dim]; allocated on the first forward.
        self._keys: list[_Array] = []
        self._values: list[_Array] = []

    def feed(self, token_id: int) -> None:
        """Queue ``token_id`` (the one just sampled) for the next forward pass."""
        self.pending.append(token_id)

    @property
    def cache_bytes(self) -> int:
        """Memory held by this state's KV cache."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self._keys, self._values, strict=True))

    def _reserve(self, config: GPT2Config, total: int) -> None:
        """Make room for ``total`` positions in every layer's cache."""
        capacity = self._keys[0].shape[1] if self._keys else 0
        if total <= capacity:
            return
        new = min(config.n_ctx, max(total, 2 * capacity, _FIRST_CAPACITY))
        head_dim = config.n_embd // config.n_head
        shape = (config.n_head, new, head_dim)
        for store in (self._keys, self._values):
            old = list(store)
            store[:] = [np.empty(shape, dtype=np.float32) for _ in range(config.n_layer)]
            for grown, before in zip(store, old, strict=False):
                grown[:, : self.length] = before[:, : self.length]


class GPT2Model:
    """GPT-2 over weights mapped read-only from a safetensors file."""

    def __init__(self, weights: GPT2Weights) -> None:
        self.weights = weights
        self.config = weights.config
        self._scale = np.float32(1.0 / np.sqrt(self.config.n_embd // self.config.n_head))

    @classmethod
    def load(cls, path: Path, *, copy: bool = False) -> GPT2Model:
        """The model in the safetensors file ``path``, memory-mapped read-only (shared by
        every process that maps it); ``copy``: a private copy in this process instead."""
        return cls(load_weights(path, copy=copy))

    def new_state(self, prompt_ids: Sequence[int]) -> DecodeState:
        """A sequence that starts with ``prompt_ids`` (at least one, at most n_ctx)."""
        self._check_ids(prompt_ids)
        return DecodeState(prompt_ids)

    def forward(self, states: Sequence[DecodeState], counts: Sequence[int] | None = None) -> _Array:
        """Feed each state's pending tokens (or only its first ``counts[i]``: a long
        prompt fed in chunks over several calls), append them to its KV cache, and
        return the logits of the last position fed: ``[len(states), vocab]``.

        All the states' tokens share each projection and MLP matmul (one ``[N, d] @ W``
        product); attention runs per state."""
        if not states:
            return np.empty((0, self.config.vocab_size), dtype=np.float32)
        return self._logits(*self._hidden(states, counts))

    def start(
        self, states: Sequence[DecodeState], counts: Sequence[int] | None = None
    ) -> ForwardPass:
        """:meth:`forward` as a pass that may stop between two layers and go on later
        (:meth:`ForwardPass.run`): a step of many states can make way for a short one
        of other states (a joining stream's prompt) without being computed twice. Until
        it ends, its states must be in no other pass."""
        if not states:
            raise EngineError("a forward pass needs at least one state")
        return ForwardPass(self, states, counts)

    def _logits(self, hidden: _Array, ends: npt.NDArray[np.intp]) -> _Array:
        last = _layer_norm(hidden[ends - 1], self.weights.ln_f_w, self.weights.ln_f_b, self._eps)
        logits: _Array = last @ self.weights.wte.T
        return logits

    def embed(self, batch: Sequence[list[int]]) -> _Array:
        """One vector per sequence: the final hidden states (after the last layer norm)
        averaged over its positions, scaled to unit length. ``[len(batch), d]``.
        A sequence longer than the context keeps its first n_ctx tokens."""
        if not batch:
            return np.empty((0, self.config.n_embd), dtype=np.float32)
        states = [self.new_state(ids[: self.config.n_ctx]) for ids in batch]
        hidden, ends = self._hidden(states)
        normed = _layer_norm(hidden, self.weights.ln_f_w, self.weights.ln_f_b, self._eps)
        starts = np.concatenate(([0], ends[:-1]))
        pooled = np.add.reduceat(normed, starts, axis=0) / (ends - starts)[:, None]
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        out: _Array = (pooled / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
        return out

    @property
    def _eps(self) -> np.float32:
        return np.float32(self.config.layer_norm_epsilon)

    def _check_ids(self, ids: Sequence[int]) -> None:
        if not ids:
            raise EngineError("a sequence needs at least one token")
        if len(ids) > self.config.n_ctx:
            raise EngineError(f"{len(ids)} tokens do not fit the context ({self.config.n_ctx})")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise EngineError(f"token ids must be in [0, {self.config.vocab_size})")

    def _hidden(self, states: Sequence[DecodeState], fed: Sequence[int] | None = None) -> _Hidden:
        """Run every state's pending tokens (its first ``fed[i]``) through the blocks: a
        :class:`ForwardPass` that nothing stops."""
        return ForwardPass(self, states, fed)._through(None)

    def _layers(
        self, states: Sequence[DecodeState], fed: Sequence[int] | None = None
    ) -> Generator[None, None, _Hidden]:
        """Every state's pending tokens (its first ``fed[i]``) through the blocks, a
        ``yield`` between two layers; returns the residual stream of all of them and
        where each state's rows end. Only :class:`ForwardPass` drives it."""
        config, w = self.config, self.weights
        if len({id(s) for s in states}) != len(states):
            raise EngineError("forward() of the same state twice in one batch")
        if fed is None:
            counts = [len(s.pending) for s in states]
        else:
            counts = [min(n, len(s.pending)) for s, n in zip(states, fed, strict=True)]
        for state, count in zip(states, counts, strict=True):
            if count < 1:
                raise EngineError("forward() of a state with no pending token")
            if state.length + count > config.n_ctx:
                raise EngineError(
                    f"the context is full: {state.length} + {count} > {config.n_ctx} tokens"
                )
            state._reserve(config, state.length + count)
        tokens = np.fromiter(
            (t for s, n in zip(states, counts, strict=True) for t in s.pending[:n]), dtype=np.intp
        )
        positions = np.concatenate(
            [np.arange(s.length, s.length + n) for s, n in zip(states, counts, strict=True)]
        )
        ends = np.cumsum(counts)
        starts = ends - np.asarray(counts)
        # States fed one token (decoding) take the batched path of _attend; the others
        # (prompts, chunks of them) attend one by one.
        singles: list[tuple[DecodeState, int]] = []
        several: list[tuple[DecodeState, int, int]] = []
        for state, start, count in zip(states, starts.tolist(), counts, strict=True):
            if count == 1:
                singles.append((state, start))
            else:
                several.append((state, start, count))
        x: _Array = w.wte[tokens] + w.wpe[positions]
        eps = self._eps
        for layer, block in enumerate(w.blocks):
            if layer:
                yield
            h = _layer_norm(x, block.ln_1_w, block.ln_1_b, eps)
            qkv: _Array = h @ block.attn_w + block.attn_b
            attended = self._attend(layer, qkv, singles, several)
            x = x + (attended @ block.attn_proj_w + block.attn_proj_b)
            h = _layer_norm(x, block.ln_2_w, block.ln_2_b, eps)
            x = x + (_gelu(h @ block.fc_w + block.fc_b) @ block.fc_proj_w + block.fc_proj_b)
        for state, count in zip(states, counts, strict=True):
            state.length += count
            del state.pending[:count]
        return x, ends

    def _attend(
        self,
        layer: int,
        qkv: _Array,
        singles: Sequence[tuple[DecodeState, int]],
        several: Sequence[tuple[DecodeState, int, int]],
    ) -> _Array:
        """Causal attention of each state's new rows over its cache; ``[N, d]``.
        ``singles``: the states fed one token, and their row; ``several``: the others,
        with their first row and how many."""
        config = self.config
        d, n_head = config.n_embd, config.n_head
        head_dim = d // n_head
        out = np.empty((qkv.shape[0], d), dtype=np.float32)
        if singles:
            self._attend_singles(layer, qkv, singles, out)
        for state, start, count in several:
            end = start + count
            past = state.length
            total = past + count
            # [count, 3d] -> q, k, v as [heads, count, head_dim]
            q, k, v = qkv[start:end].reshape(count, 3, n_head, head_dim).transpose(1, 2, 0, 3)
            keys, values = state._keys[layer], state._values[layer]
            keys[:, past:total] = k
            values[:, past:total] = v
            scores = (q @ keys[:, :total].transpose(0, 2, 1)) * self._scale  # [h, count, total]
            # New row i sits at position past + i and sees positions up to it.
            future = np.arange(total)[None, :] > (past + np.arange(count))[:, None]
            scores[:, future] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            attended = scores @ values[:, :total]  # [h, count, head_dim]
            out[start:end] = attended.transpose(1, 0, 2).reshape(count, d)
        return out

    def _attend_singles(
        self,
        layer: int,
        qkv: _Array,
        singles: Sequence[tuple[DecodeState, int]],
        out: _Array,
    ) -> None:
        """Attention of the states fed one token each (decoding), into their rows of
        ``out``. The per-state work is three BLAS calls and two cache writes, no copies:
        every state's scores land in one ``[states, heads, 1, longest]`` array (the
        positions past a state's length hold -inf, so weigh 0), whose softmax is computed
        once for all of them. At 32 states this is a fraction of attending state by state
        with a softmax each (about a dozen numpy calls per state per layer)."""
        config = self.config
        d, n_head = config.n_embd, config.n_head
        head_dim = d // n_head
        rows = qkv.shape[0]
        # Views, no copies: row r's query as [heads, 1, head_dim], key and value as
        # [heads, head_dim].
        queries = qkv[:, :d].reshape(rows, n_head, 1, head_dim)
        new_keys = qkv[:, d : 2 * d].reshape(rows, n_head, head_dim)
        new_values = qkv[:, 2 * d :].reshape(rows, n_head, head_dim)
        longest = max(state.length for state, _ in singles) + 1
        scores = np.full((len(singles), n_head, 1, longest), -np.inf, dtype=np.float32)
        for i, (state, row) in enumerate(singles):
            past = state.length
            keys = state._keys[layer]
            keys[:, past] = new_keys[row]
            state._values[layer][:, past] = new_values[row]
            # [heads, 1, head_dim] @ [heads, head_dim, past + 1]
            np.matmul(
                queries[row],
                keys[:, : past + 1].transpose(0, 2, 1),
                out=scores[i, :, :, : past + 1],
            )
        scores *= self._scale
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        for i, (state, row) in enumerate(singles):
            total = state.length + 1
            # [heads, 1, total] @ [heads, total, head_dim], straight into the row.
            np.matmul(
                scores[i, :, :, :total],
                state._values[layer][:, :total],
                out=out[row].reshape(n_head, 1, head_dim),
            )


class ForwardPass:
    """A forward pass that may stop between two layers (:meth:`GPT2Model.start`). It
    drives :meth:`GPT2Model._layers`, every forward pass's layers, stopping or not."""

    __slots__ = ("_layers", "_model")

    def __init__(
        self,
        model: GPT2Model,
        states: Sequence[DecodeState],
        counts: Sequence[int] | None = None,
    ) -> None:
        self._model = model
        self._layers = model._layers(states, counts)

    def run(self, stop: Callable[[], bool] | None = None) -> _Array | None:
        """Go on through the layers: the logits, as :meth:`GPT2Model.forward` returns
        them, once the last is done; None where ``stop()`` said so between two layers
        (call ``run`` again to go on). At least one layer is computed per call."""
        hidden = self._through(stop)
        return None if hidden is None else self._model._logits(*hidden)

    @overload
    def _through(self, stop: None) -> _Hidden: ...
    @overload
    def _through(self, stop: Callable[[], bool] | None) -> _Hidden | None: ...
    def _through(self, stop: Callable[[], bool] | None) -> _Hidden | None:
        """:meth:`run` up to the final layer norm: the residual stream and where each
        state's rows end, or None where ``stop()`` said so (never without a ``stop``)."""
        layers = self._layers
        try:
            next(layers)
            while stop is None or not stop():
                next(layers)
        except StopIteration as done:
            hidden: _Hidden = done.value
            return hidden
        return None


def _layer_norm(x: _Array, weight: _Array, bias: _Array, eps: np.float32) -> _Array:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    variance = (centred * centred).mean(axis=-1, keepdims=True)
    out: _Array = centred / np.sqrt(variance + eps) * weight + bias
    return out


def _gelu(x: _Array) -> _Array:
    # GPT-2's "gelu_new": the tanh approximation.
    out = _HALF * x * (_ONE + np.tanh(_GELU_C * (x + _GELU_K * x * x * x)))
    return out.astype(np.float32, copy=False)
