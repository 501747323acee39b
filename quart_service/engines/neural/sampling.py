"""Choosing the next token from one row of logits: temperature, top-p, a seeded generator."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["Sampler", "log_probabilities"]


class Sampler:
    """One sequence's sampler. ``temperature`` 0 takes the likeliest token (the first
    on a tie); otherwise softmax at that temperature, cut to the smallest set of most
    likely tokens whose probability reaches ``top_p``, drawn from a generator seeded
    with ``seed`` (the same seed and logits give the same tokens; None: fresh entropy).
    Only ids below ``vocab_limit`` are drawn (what the tokenizer can decode)."""

    __slots__ = ("_rng", "temperature", "top_p", "vocab_limit")

    def __init__(
        self, temperature: float, top_p: float, seed: int | None, vocab_limit: int
    ) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.vocab_limit = vocab_limit
        self._rng = np.random.default_rng(seed)

    def sample(self, logits: npt.NDArray[np.float32]) -> int:
        """The next token id for this row of logits."""
        row = logits[: self.vocab_limit]
        if self.temperature <= 0:
            return int(np.argmax(row))
        # float64 here: a float32 softmax of a large vocabulary loses the tail.
        scaled = row.astype(np.float64) / self.temperature
        scaled -= scaled.max()
        probabilities = np.exp(scaled)
        probabilities /= probabilities.sum()
        candidates = np.arange(row.shape[0])
        if self.top_p < 1.0:
            order = np.argsort(-probabilities, kind="stable")
            keep = int(np.searchsorted(np.cumsum(probabilities[order]), self.top_p)) + 1
            candidates = order[:keep]
        cumulative = np.cumsum(probabilities[candidates])
        drawn = self._rng.random() * cumulative[-1]
        # side="right": a token of probability 0 (underflow) is never drawn.
        index = int(np.searchsorted(cumulative, drawn, side="right"))
        return int(candidates[min(index, len(candidates) - 1)])


def log_probabilities(
    logits: npt.NDArray[np.float32], token: int, top: int
) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under the softmax of ``logits`` (temperature 1,
    no top_p: the model's own distribution), and the ``top`` likeliest ids with theirs,
    most likely first (the lower id first on a tie)."""
    scaled = logits.astype(np.float64)
    scaled -= scaled.max()
    logs = scaled - np.log(np.exp(scaled).sum())
    best: list[tuple[int, float]] = []
    if top > 0:
        count = min(top, logs.shape[0])
        part = np.argpartition(-logs, count - 1)[:count]
        ranked = sorted(part.tolist(), key=lambda i: (-logs[i], i))
        best = [(int(i), float(logs[i])) for i in ranked]
    return float(logs[token]), best
