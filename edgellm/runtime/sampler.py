"""Token sampling with the vendor's post_config knobs: repetition penalty, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.random import default_rng  # at import: numpy loads it lazily, which cost a server's
# first request 0.1 s

from edgellm.errors import EdgeLLMError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    penalty_window: int = 20  # how many recent tokens the penalty looks at
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise EdgeLLMError("temperature must be >= 0")
        if self.top_k < 0:
            raise EdgeLLMError("top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise EdgeLLMError("top-p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise EdgeLLMError("repetition penalty must be > 0")


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = default_rng(config.seed)

    def penalize(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        c = self.config
        if c.repetition_penalty == 1.0 or not history:
            return logits
        logits = logits.copy()
        recent = np.unique(np.asarray(history[-c.penalty_window:]))
        vals = logits[recent]
        logits[recent] = np.where(vals > 0, vals / c.repetition_penalty,
                                  vals * c.repetition_penalty)
        return logits

    def distribution(self, logits: np.ndarray, history: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, their probabilities) that a draw samples from; greedy: the argmax alone."""
        c = self.config
        logits = self.penalize(np.asarray(logits, dtype=np.float64), history)
        if c.temperature == 0:
            return np.array([int(np.argmax(logits))]), np.ones(1)
        logits = logits / c.temperature
        order = np.argsort(-logits, kind="stable")
        if c.top_k:
            order = order[:c.top_k]
        kept = logits[order]
        probs = np.exp(kept - kept.max())
        probs /= probs.sum()
        if c.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(probs), c.top_p) + 1)
            probs = probs[:cut] / probs[:cut].sum()
            order = order[:cut]
        return order, probs

    def __call__(self, logits: np.ndarray, history: list[int], exclude: int | None = None) -> int:
        """A token drawn from the distribution (without `exclude`: after a drafted token was
        rejected, the rest of the distribution, renormalised, as speculative sampling needs)."""
        order, probs = self.distribution(logits, history)
        if exclude is not None and len(order) > 1:
            probs = np.where(order == exclude, 0.0, probs)
            if probs.sum() > 0:
                probs = probs / probs.sum()
            else:
                probs = np.ones(len(order)) / len(order)
        if len(order) == 1:
            return int(order[0])
        return int(order[self.rng.choice(len(order), p=probs)])

    def accepts(self, logits: np.ndarray, history: list[int], token: int) -> bool:
        """Keep a drafted token? Greedy: it is the argmax. Sampling: with the probability the
        model gives it (the draft proposed it with certainty, so min(1, p/q) = p)."""
        order, probs = self.distribution(logits, history)
        if self.config.temperature == 0:
            return int(order[0]) == token
        hit = np.flatnonzero(order == token)
        return bool(hit.size) and self.rng.random() < probs[hit[0]]
