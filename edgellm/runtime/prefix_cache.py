"""Several conversations' KV caches kept in memory (LRU), so an agent loop, or clients taking
turns, do not prefill their shared prefix (system prompt, tool list) again; with a
runtime.prompt_store, long prefixes are kept on disk too and found again after a restart."""

from __future__ import annotations

import threading
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

    def __init__(self, gen: Generator, slots: int = 4, min_gain: int = 16, store=None):
        self.gen, self.slots, self.min_gain, self.store = gen, slots, min_gain, store
        self._saved: OrderedDict[int, _Slot] = OrderedDict()
        self._next = 0
        self.swaps = 0
        self.disk_hits = 0  # prompts whose prefix came from the store
        self._writes: list[threading.Thread] = []

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

    def _axis(self, k: np.ndarray) -> int:
        return 3 if k.ndim == 5 else 1  # ORT: [L,1,kvh,T,hd]; numpy: [L,T,kvh,hd]

    def _from_store(self, target: list[int], have: int) -> bool:
        """Restore the stored prefix sharing the most with target, where it beats `have`
        positions already at hand by min_gain; whether it did."""
        n, file = self.store.best(target)
        if n < self.store.min_tokens or n - have < self.min_gain:
            return False
        shape_probe = self.gen.engine.kv_snapshot(0)[0]
        kv = self.store.load(file, n, self._axis(shape_probe))
        if kv is None:
            return False
        if len(self.gen.cached_ids) - common_prefix(self.gen.cached_ids, target) >= \
                self.min_gain:
            self._save_live()
        self.gen.engine.kv_restore(kv)
        self.gen.cached_ids = list(target[:n])
        self.disk_hits += 1
        return True

    def remember(self, prompt_ids: list[int], whole: bool = False) -> None:
        """After a generation: keep on disk (with a store) the prefix of prompt_ids worth it: the
        part shared with a stored prompt where they part (an agent's system prompt, seen twice),
        or the whole prompt the first time one like it is seen (`whole`: always all of it but
        the last token). The K/V is copied now, written by a thread of its own."""
        if self.store is None or len(prompt_ids) - 1 < self.store.min_tokens:
            return
        target = prompt_ids[:-1]
        n, file = self.store.best(target)
        if n >= len(target):
            return  # stored whole already
        longer = file is not None and len(self.store.index.get(file, ())) > n
        keep = n if n >= self.store.min_tokens and longer and not whole else len(target)
        if keep < self.store.min_tokens or self.store.has(target[:keep]) or \
                common_prefix(self.gen.cached_ids, target) < keep:
            return
        kv = self.gen.engine.kv_snapshot(keep)
        ids = list(target[:keep])
        self._writes = [t for t in self._writes if t.is_alive()]
        writer = threading.Thread(target=self.store.save, args=(ids, kv), daemon=True,
                                  name="edgellm-prompt-store")
        writer.start()
        self._writes.append(writer)

    def warm(self, ids: list[int]) -> int:
        """Have ids' K/V at hand before any request: restored (from memory or the store) or
        prefilled, then kept (saved in memory; on disk with a store). The positions read
        instead of computed."""
        self.prepare(ids + [0])
        have = common_prefix(self.gen.cached_ids, ids)
        if have < len(ids):
            self.gen.prefill(ids[have:], have)
        self.remember(ids + [0], whole=True)
        self._save_live()
        self.flush()
        return have

    def flush(self) -> None:
        """Wait for the store's writes under way."""
        for t in self._writes:
            t.join()
        self._writes = []

    def prepare(self, prompt_ids: list[int]) -> None:
        """Make the live cache the one sharing the longest prefix with prompt_ids (in memory,
        or with a store on disk)."""
        target = prompt_ids[:-1]  # the last prompt token always runs
        live = common_prefix(self.gen.cached_ids, target)
        best_key, best = None, live
        for key, slot in self._saved.items():
            n = common_prefix(slot.ids, target)
            if n > best:
                best_key, best = key, n
        if self.store is not None and self._from_store(target, best):
            return
        if best_key is None or best - live < self.min_gain:
            if len(self.gen.cached_ids) - live >= self.min_gain:
                self._save_live()  # another conversation is about to overwrite it
            return
        slot = self._saved.pop(best_key)
        self._save_live()
        k, v = slot.kv
        axis = self._axis(k)
        self.gen.engine.kv_restore((np.take(k, range(best), axis=axis),
                                    np.take(v, range(best), axis=axis)))
        self.gen.cached_ids = list(slot.ids[:best])
        self._saved[best_key] = slot  # still useful later; most recently used now
        self.swaps += 1
