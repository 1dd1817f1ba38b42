"""Who generates when: N generation slots (`serve --parallel N`), requests admitted up to a bound.

A request takes a free slot (the one whose cache shares the longest prefix with its prompt) or
waits for one; with several slots, their decode steps run batched (runtime.batch). The routes
only admit a request, run it (or stream its text pieces) and cancel it."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field, replace

from edgellm.chat.constrained import TokenMask, ToolCallGrammar
from edgellm.errors import EdgeLLMError
from edgellm.runtime.batch import Batcher, SlotEngine
from edgellm.runtime.generator import GenerationResult, Generator
from edgellm.runtime.cache_reuse import common_prefix
from edgellm.runtime.prefix_cache import PrefixCache
from edgellm.server.errors import APIError
from edgellm.server.metrics import REJECTED
from edgellm.server.request_log import note_tokens


@dataclass
class Slot:
    """One generation at a time: its decode loop over its own region of the KV cache."""

    index: int
    gen: Generator
    prefix_cache: PrefixCache
    busy: bool = False


@dataclass
class Scheduler:
    """The model and its generation slots."""

    gen: Generator  # the model's text interface (and, with one slot, its only engine)
    max_queue: int
    prefix_cache: PrefixCache  # slot 0's
    pending: int = 0  # admitted requests (running + waiting)
    grammar: ToolCallGrammar | None = None  # built by the first request that needs a mask
    # or, given, by this (a concurrent.futures.Future: serve starts it as the model loads)
    grammar_build: object | None = None
    closing: threading.Event = field(default_factory=threading.Event)  # the server stops
    speculate: str = "auto"  # runtime.speculative mode for every request
    tool_system: str | None = None  # serve --tool-system-prompt
    check_calls: float | None = None  # serve --check-calls: the p(yes) a call must have
    slots: list[Slot] = field(default_factory=list)
    batcher: Batcher | None = None
    free: threading.Condition = field(default_factory=threading.Condition)
    metrics: dict = field(default_factory=lambda: {
        "requests_total": 0, "rejected_total": dict.fromkeys(REJECTED, 0),
        "prompt_tokens_total": 0,
        "completion_tokens_total": 0, "prefix_cache_hits_total": 0,
        "prefix_cache_reused_tokens_total": 0, "draft_tokens_proposed_total": 0,
        "draft_tokens_accepted_total": 0, "last_decode_tok_s": 0.0, "last_ttft_ms": 0.0})

    def __post_init__(self):
        if not self.slots:
            self.slots = [Slot(0, self.gen, self.prefix_cache)]

    @classmethod
    def batched(cls, gen: Generator, max_queue: int, cache_slots: int,
                prefill_budget: int | None = None, store=None, reuse: int = 0,
                **opts) -> "Scheduler":
        """One slot per KV-cache slot of gen's engine (built with slots=N), decode batched
        (prefill_budget: runtime.batch's prefill policy); `store`: the prompt store on disk
        the slots share (runtime.prompt_store), or None; `reuse`: PrefixCache's runs moved
        past a change (runtime.cache_reuse; 0: off)."""
        n = getattr(gen.engine, "slots", 1)
        if n == 1:
            return cls(gen, max_queue, PrefixCache(gen, cache_slots, store=store, reuse=reuse),
                       **opts)
        batcher = Batcher(gen.engine, prefill_budget=prefill_budget)
        gens = [gen.for_engine(SlotEngine(batcher, i)) for i in range(n)]
        per_slot = max(1, cache_slots // n)  # saved prefixes are whole KV copies
        slots = [Slot(i, g, PrefixCache(g, per_slot, store=store, reuse=reuse))
                 for i, g in enumerate(gens)]
        return cls(gen, max_queue, slots[0].prefix_cache, slots=slots, batcher=batcher, **opts)

    def _take_slot(self, ids: list[int], stopped) -> Slot | None:
        """A free slot, the one sharing the longest prefix with the prompt; None if the request
        stopped while it waited."""
        with self.free:
            while True:
                free = [s for s in self.slots if not s.busy]
                if free:
                    slot = max(free, key=lambda s: common_prefix(s.gen.cached_ids, ids[:-1]))
                    slot.busy = True
                    return slot
                self.free.wait(0.1)  # a request whose client left while it waited leaves
                if stopped():        # the line at once
                    return None

    def _give_back(self, slot: Slot):
        if self.batcher:
            self.batcher.release(slot.index)
        with self.free:
            slot.busy = False
            self.free.notify()

    def state(self) -> dict:
        """Slots busy, requests waiting, and (batched) the mean batch since start and the
        decode throughput of the last 10 s."""
        active = sum(s.busy for s in self.slots)
        tok_s = self.batcher.throughput()[0] if self.batcher else 0.0
        steps = self.batcher.steps if self.batcher else 0
        return {"queue_depth": self.pending, "slots": len(self.slots), "active_slots": active,
                "queued_requests": max(self.pending - active, 0), "batch_steps_total": steps,
                "batch_size_mean": round(self.batcher.rows / steps, 2) if steps else 0.0,
                "decode_tok_s_aggregate": round(tok_s, 1)}

    def admit(self):
        """Take a request in line, or refuse it (429) past the queue bound or while the
        server shuts down (an empty 200 answer would look like the model's)."""
        if self.closing.is_set():
            self.metrics["rejected_total"]["shutting_down"] += 1
            raise APIError(503, "the server is shutting down; retry shortly", "server_error",
                           "shutting_down", headers={"Retry-After": "1"})
        if self.pending > self.max_queue:
            self.metrics["rejected_total"]["queue_full"] += 1
            raise APIError(429, "the server is busy; retry shortly", "rate_limit_error",
                           "queue_full", headers={"Retry-After": "1"})
        self.pending += 1
        self.metrics["requests_total"] += 1

    def check_context(self, ids: list[int]):
        limit = self.gen.engine.kv_cache_len
        if len(ids) >= limit:
            from edgellm.runtime.context import more_context

            self.metrics["rejected_total"]["context_length"] += 1
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context holds "
                                f"{limit}: {more_context(self.gen.engine.config, len(ids))}",
                           code="context_length_exceeded", param="messages")

    def mask(self, build, param: str) -> TokenMask:
        """`build(grammar)`'s token mask for one request (the model's grammar tokenizer is made
        on first use, about a second); a grammar llguidance refuses is the request's fault."""
        if self.grammar is None and self.grammar_build is not None:
            try:
                self.grammar = self.grammar_build.result()
            except Exception:  # noqa: BLE001 (made again below, where its error is the answer)
                pass
            self.grammar_build = None
        if self.grammar is None:
            self.grammar = ToolCallGrammar.for_generator(self.gen)
        try:
            return build(self.grammar)
        except EdgeLLMError as e:
            raise APIError(400, str(e), param=param) from None

    def open(self):
        """Serve (again): the app's lifespan starts, a second time in tests that reuse it."""
        self.closing.clear()

    def close(self):
        """Stop every running and queued generation at its next step (server shutdown)."""
        self.closing.set()

    def finish_writes(self):
        """Wait for the prompt store's writes under way (at shutdown: a prefix remembered just
        before a stop is on disk for the next start, not lost with the process)."""
        for slot in self.slots:
            slot.prefix_cache.flush()

    async def run(self, ids, sampling, max_tokens, stop, on_text=None,
                  cancel: threading.Event | None = None, mask: TokenMask | None = None
                  ) -> GenerationResult:
        """Run one admitted request in the worker thread; its queue place is freed however it
        ends."""
        cancel = cancel or threading.Event()
        limit = self.gen.engine.kv_cache_len
        stopped = lambda: cancel.is_set() or self.closing.is_set()  # noqa: E731

        def work():
            slot = self._take_slot(ids, stopped)
            if slot is None:
                return None
            try:
                start = time.perf_counter()
                if not stopped():
                    slot.prefix_cache.prepare(ids, stopped)
                preparing = time.perf_counter() - start  # restoring, moving, the change
                result = slot.gen.generate(ids, sampling,
                                           min(max_tokens or limit, limit - len(ids)),
                                           on_text=on_text, reuse_cache=True, stop=stop,
                                           cancelled=stopped, mask=mask,
                                           speculate=self.speculate)
                result = replace(result, ttft_ms=round(result.ttft_ms + preparing * 1000, 2))
                if result.stop_reason != "cancelled":
                    slot.prefix_cache.remember(ids)  # long prefixes on disk, with a store
                return result
            finally:
                self._give_back(slot)

        try:
            self.check_context(ids)
            result = await asyncio.get_running_loop().run_in_executor(None, work)
        except EdgeLLMError as e:  # the model failed (damaged weights, a grammar dead end)
            raise APIError(500, f"generation failed: {e}", "server_error", "model_error") \
                from None
        finally:
            self.pending -= 1
        if self.closing.is_set() and (result is None or result.stop_reason == "cancelled"):
            # the server stops (SIGTERM, Ctrl-C): the client hears it, a stream as an error
            # event, rather than an answer cut short that looks whole
            raise APIError(503, "the server is shutting down; the answer was stopped",
                           "server_error", "shutting_down", headers={"Retry-After": "1"})
        if result is None:
            return GenerationResult("", [], len(ids), 0.0, 0.0, 0.0, "cancelled")
        self.record(result)
        return result

    async def follow_up(self, ids, sampling, max_tokens, stop, cancel=None, mask=None
                        ) -> GenerationResult:
        """A further generation for a request already admitted (serve --check-calls: its
        question, its answer again): run as any, in the line again."""
        self.pending += 1
        return await self.run(ids, sampling, max_tokens, stop, cancel=cancel, mask=mask)

    def stream(self, ids, sampling, max_tokens, stop, mask: TokenMask | None = None,
               pieces: bool = True) -> "TextPieces":
        """Start an admitted request; iterate the result for its text pieces as they come
        (none when `pieces` is False), then ask it for the whole result."""
        return TextPieces(self, ids, sampling, max_tokens, stop, mask, pieces)

    def record(self, r: GenerationResult):
        m = self.metrics
        m["prompt_tokens_total"] += r.prompt_tokens
        m["completion_tokens_total"] += len(r.token_ids)
        m["prefix_cache_hits_total"] += r.reused_tokens > 0
        m["prefix_cache_reused_tokens_total"] += r.reused_tokens
        if r.speculation:
            m["draft_tokens_proposed_total"] += r.speculation.proposed
            m["draft_tokens_accepted_total"] += r.speculation.accepted
        m["last_decode_tok_s"], m["last_ttft_ms"] = r.decode_tok_s, r.ttft_ms
        note_tokens(r.prompt_tokens, len(r.token_ids))


class TextPieces:
    """A running request: `async for piece in it`, then `result()`; `cancel()` stops it (a
    client that went away)."""

    def __init__(self, scheduler: Scheduler, ids, sampling, max_tokens, stop, mask, pieces):
        self._queue, self._cancel = asyncio.Queue(), threading.Event()
        loop = asyncio.get_running_loop()
        on_text = (lambda piece: loop.call_soon_threadsafe(self._queue.put_nowait, piece)) \
            if pieces else None
        self._task = asyncio.ensure_future(scheduler.run(ids, sampling, max_tokens, stop,
                                                         on_text, self._cancel, mask))
        self._task.add_done_callback(lambda _: self._queue.put_nowait(None))

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        piece = await self._queue.get()
        if piece is None:
            raise StopAsyncIteration
        return piece

    def result(self) -> GenerationResult:
        return self._task.result()

    def cancel(self):
        self._cancel.set()
