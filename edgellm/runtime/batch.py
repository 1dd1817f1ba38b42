"""Several generations on one engine at once: their one-token steps run as one batched call.

Each of the engine's KV-cache slots gets a `SlotEngine`, which looks to a Generator like an
engine of its own. A one-token forward (a decode step) waits at the `Batcher` until every other
slot that is decoding has asked for its step too (or `max_wait` has passed), and then one
`engine.decode_rows` call runs them all: decode is bandwidth-bound, so B tokens cost far less
than B calls. A several-token forward (a prefill chunk, a speculative verify) runs alone.

Prefill policy (`serve --prefill-budget`): the chunks (the artifact's prefill_len, 128 tokens)
of the prompts waiting for the engine run one after another until `prefill_budget` prompt tokens
(default: one chunk) have run since the last decode step; then the decoding slots get a step.
Several short prompts arriving together are all prefilled before the next step (their first
tokens come sooner), and a long prompt slows the others by one budget at a time but never stops
them.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time

import numpy as np


class Batcher:
    def __init__(self, engine, max_wait: float = 0.03, prefill_budget: int | None = None):
        self.engine, self.max_wait = engine, max_wait
        self.prefill_budget = prefill_budget or engine.prefill_len
        self.cond = threading.Condition()
        self.engine_lock = threading.Lock()  # one engine call at a time
        self.pending: dict[int, tuple[int, int]] = {}  # slot -> (token, position)
        self.results: dict[int, np.ndarray] = {}
        self.decoding: set[int] = set()  # slots expected to ask for a step
        self.fill = [0] * engine.slots  # positions written per slot (rows without a request)
        self.running = False
        self.prefilling: set[int] = set()  # slots prefilling (or verifying) a prompt
        self.prefilled = 0  # their tokens admitted since the last decode step
        self.steps = 0
        self.rows = 0  # slots stepped, summed over the steps
        self.recent: collections.deque = collections.deque(maxlen=256)  # (time, batch size)

    def step(self, slot: int, token: int, pos: int) -> np.ndarray:
        """The logits after `token` at `pos` of `slot`, computed with the other slots' steps."""
        with self.cond:
            self.decoding.add(slot)
            self.pending[slot] = (token, pos)
            self.cond.notify_all()
            deadline = time.monotonic() + self.max_wait
            while slot not in self.results:
                # the wait for the others starts when the engine is free (else a step that came
                # in during a batch or a prefill turn would run alone right after it)
                if self.running or self._prefill_turn():
                    self.cond.wait(0.05)
                    deadline = time.monotonic() + self.max_wait
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
        self.prefilled = 0
        self.steps += 1
        self.rows += len(batch)
        self.recent.append((time.monotonic(), len(batch)))
        self.cond.notify_all()

    def _prefill_turn(self) -> bool:
        """Whether a prompt's chunk goes before the next decode step (a prompt whose last
        chunk is one token asks for it as a step: it waits with the others)."""
        return bool(self.prefilling - self.pending.keys()) and \
            self.prefilled < self.prefill_budget

    @contextlib.contextmanager
    def prefill(self, slot: int):
        """A prompt's chunks (several forward_many calls) count as one prefill: while it lasts,
        the decoding slots wait for the budget to be spent, not for a chunk to end."""
        self._enter(slot)
        try:
            yield
        finally:
            self._leave(slot)

    def _enter(self, slot: int):
        with self.cond:
            self.decoding.discard(slot)  # not asking for a step while this runs
            self.prefilling.add(slot)
            self.cond.notify_all()

    def _leave(self, slot: int):
        with self.cond:
            self.prefilling.discard(slot)
            self.cond.notify_all()

    def forward_many(self, slot: int, tokens, pos: int, all_logits: bool) -> np.ndarray:
        """A several-token forward of one slot, alone, once the prefill budget allows it."""
        own = slot not in self.prefilling  # a verify, or a chunk outside prefill()
        if own:
            self._enter(slot)
        try:
            with self.cond:
                self._decoding_turn()
                # counted now, not when it ran: chunks admitted together stay within the budget
                self.prefilled += len(tokens)
                self.cond.notify_all()  # (steps waiting on the budget see it spent)
            with self.engine_lock:
                out = self.engine.forward(tokens, pos, all_logits, slot=slot)
                self.fill[slot] = pos + len(tokens)
        finally:
            if own:
                self._leave(slot)
        return out

    def _decoding_turn(self):
        """The budget spent: the decoding slots' step before the next chunk (called holding
        cond). It runs what they have asked for once all have asked, or after max_wait; with
        nothing asked by then (they are busy elsewhere), the chunk goes first."""
        deadline = time.monotonic() + self.max_wait
        while self.running or (self.decoding and self.prefilled >= self.prefill_budget):
            late = time.monotonic() >= deadline
            if self.running:
                self.cond.wait(0.005)
            elif self.pending and (self.decoding <= self.pending.keys() or late):
                self._run_batch()  # (it leaves prefilled at 0)
            elif late:
                return
            else:
                self.cond.wait(0.005)

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
        self.row_cost = getattr(engine, "row_cost", lambda: None)  # as the engine measured
        if hasattr(engine, "kernel"):
            self.kernel = engine.kernel
        self.cache_type = getattr(engine, "cache_type", "fp32")
        self.key_scale = getattr(engine, "key_scale", None)  # an int8 cache's (kv_quant)
        self.value_scale = getattr(engine, "value_scale", None)

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

    def prefilling(self):
        """The context of one prompt's prefill (Batcher.prefill)."""
        return self.batcher.prefill(self.slot)

    def kv_snapshot(self, n: int):
        with self.batcher.engine_lock:
            return self.batcher.engine.kv_snapshot(n, slot=self.slot)

    def kv_restore(self, snapshot, at: int = 0) -> int:
        with self.batcher.engine_lock:
            end = self.batcher.engine.kv_restore(snapshot, slot=self.slot, at=at)
            self.batcher.fill[self.slot] = max(self.batcher.fill[self.slot], end)
        return end
