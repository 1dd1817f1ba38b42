"""Several conversations' KV caches kept in memory (LRU), so an agent loop, or clients taking
turns, do not prefill their shared prefix (system prompt, tool list) again."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from edgellm.runtime.generator import Generator


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Slot:
    ids: list[int]
    kv: tuple[np.ndarray, np.ndarray]


class PrefixCache:
    """The engine's live cache plus up to `slots` saved ones; `prepare` swaps in the best."""

    def __init__(self, gen: Generator, slots: int = 4, min_gain: int = 16):
        self.gen, self.slots, self.min_gain = gen, slots, min_gain
        self._saved: OrderedDict[int, _Slot] = OrderedDict()
        self._next = 0
        self.swaps = 0

    def _save_live(self):
        ids = list(self.gen.cached_ids)
        if not ids or self.slots == 0:
            return
        for key, slot in self._saved.items():  # already saved (a prefix of the live one)?
            if slot.ids == ids[:len(slot.ids)]:
                del self._saved[key]
                break
        self._saved[self._next] = _Slot(ids, self.gen.engine.kv_snapshot(len(ids)))
        self._next += 1
        while len(self._saved) > self.slots:
            self._saved.popitem(last=False)  # least recently used

    def prepare(self, prompt_ids: list[int]) -> None:
        """Make the live cache the one sharing the longest prefix with prompt_ids."""
        target = prompt_ids[:-1]  # the last prompt token always runs
        live = common_prefix(self.gen.cached_ids, target)
        best_key, best = None, live
        for key, slot in self._saved.items():
            n = common_prefix(slot.ids, target)
            if n > best:
                best_key, best = key, n
        if best_key is None or best - live < self.min_gain:
            if len(self.gen.cached_ids) - live >= self.min_gain:
                self._save_live()  # another conversation is about to overwrite it
            return
        slot = self._saved.pop(best_key)
        self._save_live()
        k, v = slot.kv
        axis = 3 if k.ndim == 5 else 1  # ORT: [L,1,kvh,T,hd]; numpy: [L,T,kvh,hd]
        self.gen.engine.kv_restore((np.take(k, range(best), axis=axis),
                                    np.take(v, range(best), axis=axis)))
        self.gen.cached_ids = list(slot.ids[:best])
        self._saved[best_key] = slot  # still useful later; most recently used now
        self.swaps += 1
