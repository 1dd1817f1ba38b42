"""Several generations on one engine at once: their one-token steps run as one batched call.

Each of the engine's KV-cache slots gets a `SlotEngine`, which looks to a Generator like an
engine of its own. A one-token forward (a decode step) waits at the `Batcher` until every other
slot that is decoding has asked for its step too (or `max_wait` has passed), and then one
`engine.decode_rows` call runs them all: decode is bandwidth-bound, so B tokens cost far less
than B calls. A several-token forward (a prefill chunk, a speculative verify) runs alone, and
between two chunks of one prompt the decoding slots get a step: a long prompt slows the others
by one chunk at a time (the artifact's prefill_len, 128 tokens) but does not stop them.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np


class Batcher:
    def __init__(self, engine, max_wait: float = 0.03):
        self.engine, self.max_wait = engine, max_wait
        self.cond = threading.Condition()
        self.engine_lock = threading.Lock()  # one engine call at a time
        self.pending: dict[int, tuple[int, int]] = {}  # slot -> (token, position)
        self.results: dict[int, np.ndarray] = {}
        self.decoding: set[int] = set()  # slots expected to ask for a step
        self.fill = [0] * engine.slots  # positions written per slot (rows without a request)
        self.running = False
        self.steps = 0
        self.recent: collections.deque = collections.deque(maxlen=256)  # (time, batch size)

    def step(self, slot: int, token: int, pos: int) -> np.ndarray:
        """The logits after `token` at `pos` of `slot`, computed with the other slots' steps."""
        with self.cond:
            self.decoding.add(slot)
            self.pending[slot] = (token, pos)
            self.cond.notify_all()
            deadline = time.monotonic() + self.max_wait
            while slot not in self.results:
                if self.running:  # the wait for the others starts when the engine is free:
                    self.cond.wait(0.05)  # else a step that came in during a batch would run
                    deadline = time.monotonic() + self.max_wait  # alone right after it
                    continue
                if self.decoding <= self.pending.keys() or time.monotonic() >= deadline:
                    self._run_batch()
                else:
                    self.cond.wait(max(deadline - time.monotonic(), 0.0005))
            result = self.results.pop(slot)
        if isinstance(result, BaseException):
            raise result
        return result

    def _run_batch(self):
        """Run every pending step (called holding cond; releases it while the engine runs)."""
        batch, self.pending = self.pending, {}
        self.running = True
        first, last = min(batch), max(batch)
        rows = range(first, last + 1)
        tokens = [batch[s][0] if s in batch else -1 for s in rows]
        self.cond.release()
        try:
            with self.engine_lock:  # (fill is read and written under the engine lock)
                # a row without a request writes where its slot holds nothing it needs: its
                # first unwritten position, read now, after any prefill chunk before this call
                # (the last position of a full cache, which no prompt can reuse)
                positions = [batch[s][1] if s in batch else
                             min(self.fill[s], self.engine.kv_cache_len - 1) for s in rows]
                logits = self.engine.decode_rows(first, tokens, positions)
                for s in batch:
                    self.fill[s] = max(self.fill[s], batch[s][1] + 1)
        except BaseException as e:  # every waiting slot hears of it
            logits = e
        finally:
            self.cond.acquire()
        for s in batch:
            self.results[s] = logits if isinstance(logits, BaseException) else logits[s - first]
        self.running = False
        self.steps += 1
        self.recent.append((time.monotonic(), len(batch)))
        self.cond.notify_all()

    def forward_many(self, slot: int, tokens, pos: int, all_logits: bool) -> np.ndarray:
        """A several-token forward of one slot, alone; then, if steps wait, one batch first."""
        with self.cond:
            self.decoding.discard(slot)  # not asking for a step while this runs
            self.cond.notify_all()
        with self.engine_lock:
            out = self.engine.forward(tokens, pos, all_logits, slot=slot)
            self.fill[slot] = pos + len(tokens)
        with self.cond:
            steps = self.steps
            # the decoding slots' turn: a batch waiting (or formed and waiting for the engine,
            # which this thread could otherwise take again first) runs before the next chunk
            while (self.pending or self.running) and self.steps == steps:
                if not self.running:
                    self._run_batch()
                else:
                    self.cond.wait(0.01)
        return out

    def release(self, slot: int):
        """The slot's generation ended: nobody waits for its steps."""
        with self.cond:
            self.decoding.discard(slot)
            self.cond.notify_all()

    def shared(self, slot: int) -> bool:
        """Whether another slot is decoding beside this one."""
        with self.cond:
            return bool(self.decoding - {slot})

    def throughput(self, window: float = 10.0) -> tuple[float, float]:
        """(tokens per second over the last `window` seconds of steps, mean batch size)."""
        now = time.monotonic()
        with self.cond:
            recent = [(t, n) for t, n in self.recent if now - t <= window]
        if len(recent) < 2:
            return 0.0, float(recent[0][1]) if recent else 0.0
        span = recent[-1][0] - recent[0][0]
        tokens = sum(n for _, n in recent[1:])
        return (tokens / span if span > 0 else 0.0), sum(n for _, n in recent) / len(recent)


class SlotEngine:
    """One slot of a batched engine, with the engine interface a Generator uses."""

    def __init__(self, batcher: Batcher, slot: int):
        self.batcher, self.slot = batcher, slot
        engine = batcher.engine
        self.config, self.kv_cache_len = engine.config, engine.kv_cache_len
        self.prefill_len, self.hidden_type = engine.prefill_len, engine.hidden_type
        self.threads = engine.threads
        self.relaid = getattr(engine, "relaid", set())

    def drafts_welcome(self) -> bool:
        """Speculative drafts only while this slot decodes alone: a verify of several tokens
        runs outside the batch and would hold the other slots back (the batch uses the spare
        compute a draft would)."""
        return not self.batcher.shared(self.slot)

    def embed_tokens(self, tokens):
        return self.batcher.engine.embed_tokens(tokens)

    def forward(self, tokens, pos: int, all_logits: bool = False) -> np.ndarray:
        if len(tokens) == 1 and not all_logits:
            return self.batcher.step(self.slot, int(tokens[0]), pos)
        return self.batcher.forward_many(self.slot, tokens, pos, all_logits)

    def kv_snapshot(self, n: int):
        with self.batcher.engine_lock:
            return self.batcher.engine.kv_snapshot(n, slot=self.slot)

    def kv_restore(self, snapshot) -> int:
        with self.batcher.engine_lock:
            n = self.batcher.engine.kv_restore(snapshot, slot=self.slot)
            self.batcher.fill[self.slot] = max(self.batcher.fill[self.slot], n)
        return n
