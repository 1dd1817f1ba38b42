"""Prompt lookup: draft tokens by copying what followed the latest earlier occurrence of the
text's last n tokens (in the prompt or the answer so far), for the target to verify in one
multi-token forward. No second model; llama.cpp's `--lookup` and Transformers'
`prompt_lookup_num_tokens` do the same.

How much to draft adapts to what was accepted: k grows by one after a draft accepted whole,
halves after one rejected at its first token, and drafting pauses for a while after several drafts
in a row bought nothing, so free text (few matches, and those rarely right) runs as plain decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgellm.errors import EdgeLLMError

MODES = ("auto", "lookup", "off")


@dataclass
class SpeculationStats:
    forwards: int = 0  # target forwards during decode (each verifies 0..k drafted tokens)
    proposed: int = 0  # drafted tokens sent to the target
    accepted: int = 0  # drafted tokens the target agreed with

    def to_json(self) -> dict:
        return {"forwards": self.forwards, "draft_proposed": self.proposed,
                "draft_accepted": self.accepted}


def drafter(mode: str) -> "PromptLookup | None":
    """The drafter of a --speculate mode: `auto` pauses where drafts keep failing, `lookup`
    drafts wherever a match is, `off` none."""
    if mode not in MODES:
        raise EdgeLLMError(f"speculate must be one of {', '.join(MODES)}, not {mode!r}")
    return None if mode == "off" else PromptLookup(patience=4 if mode == "auto" else None)


@dataclass
class PromptLookup:
    """N-gram drafting over the token history (grows by `extend`; `propose` reads its tail)."""

    max_ngram: int = 3
    min_ngram: int = 2  # a one-token match is right too rarely to pay for verifying it
    k_min: int = 1
    k_max: int = 10
    k: int = 4
    patience: int | None = 4  # drafts in a row with nothing accepted before a pause (None: never)
    pause: int = 16  # decode steps without drafting after that
    history: list[int] = field(default_factory=list)
    _index: dict = field(default_factory=dict)  # n-gram -> position right after its latest end
    _misses: int = 0
    _paused: int = 0

    def extend(self, tokens: list[int]) -> None:
        """Append tokens; each n-gram that now has a token after it becomes a lookup entry."""
        h = self.history
        for t in tokens:
            h.append(t)
            end = len(h) - 1  # the n-grams ending just before the new token have a continuation
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self._index[tuple(h[end - n:end])] = end

    def propose(self, room: int) -> list[int]:
        """Up to min(k, room) tokens that followed the longest recent match of the tail."""
        if self._paused:
            self._paused -= 1
            return []
        h, k = self.history, min(self.k, room)
        if k <= 0:
            return []
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            start = self._index.get(tuple(h[-n:])) if len(h) >= n else None
            if start is not None:
                return h[start:start + k]
        return []

    def update(self, proposed: int, accepted: int) -> None:
        """Adapt k (and pause) to how much of the last draft of `proposed` tokens was kept."""
        if not proposed:
            return
        if accepted == proposed:
            self.k = min(self.k + 1, self.k_max)
        elif accepted == 0:
            self.k = max(self.k // 2, self.k_min)
        else:
            self.k = max(min(self.k, accepted + 1), self.k_min)
        self._misses = 0 if accepted else self._misses + 1
        if self.patience is not None and self._misses >= self.patience:
            self._paused, self._misses = self.pause, 0
