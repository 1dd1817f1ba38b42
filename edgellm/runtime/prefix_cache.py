"""Several conversations' KV caches kept in memory (LRU), so an agent loop, or clients taking
turns, do not prefill their shared prefix (system prompt, tool list) again; with a
runtime.prompt_store, long prefixes are kept on disk too and found again after a restart."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from edgellm.runtime.cache_reuse import common_prefix
from edgellm.runtime.generator import Generator
from edgellm.runtime.prompt_store import positions


@dataclass
class _Slot:
    ids: list[int]
    kv: tuple[np.ndarray, np.ndarray]


class PrefixCache:
    """The engine's live cache plus up to `slots` saved ones; `prepare` swaps in the best."""

    def __init__(self, gen: Generator, slots: int = 4, min_gain: int = 16, store=None,
                 reuse: int = 0):
        """reuse: past the shared prefix, move runs of at least this many tokens that the
        cached prompt has too (runtime.cache_reuse; 0: only the prefix is reused)."""
        self.gen, self.slots, self.min_gain, self.store = gen, slots, min_gain, store
        self.reuse = reuse
        self._saved: OrderedDict[int, _Slot] = OrderedDict()
        self._next = 0
        self.swaps = 0
        self.disk_hits = 0  # prompts whose prefix came from the store
        self.moved = 0  # prompt tokens whose K/V were moved from after a change
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

    def _from_store(self, target: list[int], have: int):
        """Restore the stored prefix sharing the most with target, where it beats `have`
        positions already at hand by min_gain; (the stored ids, a loader of their K/V) when it
        did, else None."""
        n, file = self.store.best(target)
        if n < self.store.min_tokens or n - have < self.min_gain:
            return None
        axis = self._axis(self.gen.engine.kv_snapshot(0)[0])
        stored = list(self.store.index.get(file, ()))
        kv = self.store.load(file, len(stored), axis)  # read and checked whole either way
        if kv is None or kv[0].shape[axis] < n:  # (gone, or evicted since best() saw it)
            return None
        if len(self.gen.cached_ids) - common_prefix(self.gen.cached_ids, target) >= \
                self.min_gain:
            self._save_live()
        self.gen.engine.kv_restore(tuple(positions(a, 0, n, axis) for a in kv))
        self.gen.cached_ids = list(target[:n])
        self.disk_hits += 1
        return stored, lambda: kv

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

    def prepare(self, prompt_ids: list[int], cancelled=None) -> None:
        """Make the live cache the one sharing the longest prefix with prompt_ids (in memory,
        or with a store on disk); with `reuse`, runs of that cached prompt found after the
        change are moved in too and the tokens between them computed (until `cancelled`)."""
        target = prompt_ids[:-1]  # the last prompt token always runs
        live = common_prefix(self.gen.cached_ids, target)
        best_key, best = None, live
        for key, slot in self._saved.items():
            n = common_prefix(slot.ids, target)
            if n > best:
                best_key, best = key, n
        source = self._from_store(target, best) if self.store is not None else None
        if source is None and (best_key is None or best - live < self.min_gain):
            source = list(self.gen.cached_ids), None  # None: the live cache's own K/V
            if len(self.gen.cached_ids) - live >= self.min_gain:
                self._save_live()  # another conversation is about to overwrite it
        elif source is None:
            slot = self._saved.pop(best_key)
            self._save_live()
            k, v = slot.kv
            axis = self._axis(k)
            self.gen.engine.kv_restore((positions(k, 0, best, axis),
                                        positions(v, 0, best, axis)))
            self.gen.cached_ids = list(slot.ids[:best])
            self._saved[best_key] = slot  # still useful later; most recently used now
            self.swaps += 1
            source = slot.ids, lambda: slot.kv
        if self.reuse:
            self._move_runs(target, *source, cancelled)

    def _move_runs(self, target: list[int], old: list[int], load, cancelled) -> None:
        """After the prefix at hand: the runs of `old` that target has too, moved to their
        places in target (keys rotated by the distance), the tokens between them computed."""
        from edgellm.runtime.cache_reuse import moved_keys, runs

        start = common_prefix(self.gen.cached_ids, target)
        found = runs(old, target, start, self.reuse)
        if sum(n for *_, n in found) < self.min_gain:
            return
        kv = load() if load else self.gen.engine.kv_snapshot(len(old))  # (copied first)
        if kv is None:
            return
        del self.gen.cached_ids[start:]
        engine, (k, v) = self.gen.engine, kv
        axis = self._axis(k)
        for new_pos, old_pos, n in found:
            keys, values = (positions(a, old_pos, old_pos + n, axis) for a in (k, v))
            engine.kv_restore((moved_keys(keys, engine.config, engine.kv_cache_len,
                                          new_pos - old_pos, getattr(engine, "key_scale", None)),
                               values), at=new_pos)
        end = start
        for new_pos, _, n in found:
            if new_pos > end and self.gen.prefill(target[end:new_pos], end, cancelled) is None:
                return  # cancelled: the cache holds target[:end + what was computed]
            self.gen.cached_ids = list(target[:new_pos + n])
            end = new_pos + n
            self.moved += n
