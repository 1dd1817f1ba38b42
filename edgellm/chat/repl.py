"""`edgellm chat`: a terminal conversation that keeps its KV cache across turns."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from edgellm.errors import EdgeLLMError
from edgellm.runtime.generator import GenerationResult, Generator
from edgellm.runtime.sampler import SamplingConfig

HELP = "commands: /reset, /system TEXT, /stats, /exit (Ctrl-C stops an answer)"


def _stats(r: GenerationResult) -> str:
    return (f"[ttft {r.ttft_ms:.0f} ms | prefill {r.prompt_tokens - r.reused_tokens} new tokens "
            f"({r.reused_tokens} reused), {r.prefill_tok_s:.1f} tok/s | decode "
            f"{len(r.token_ids)} tokens, {r.decode_tok_s:.1f} tok/s]")


@dataclass
class Totals:
    """The conversation since it began or was last cleared (/reset, /system), for /stats."""

    turns: int = 0
    stopped: int = 0  # of the turns, answers stopped with Ctrl-C (they stay in the conversation)
    prefilled: int = 0  # prompt tokens run through the model
    reused: int = 0  # prompt tokens whose K/V were already in the cache
    generated: int = 0
    decode_seconds: float = 0.0

    def add(self, r: GenerationResult):
        self.turns += 1
        self.prefilled += r.prompt_tokens - r.reused_tokens
        self.reused += r.reused_tokens
        self.generated += len(r.token_ids)
        if r.decode_tok_s > 0 and len(r.token_ids) > 1:
            self.decode_seconds += (len(r.token_ids) - 1) / r.decode_tok_s

    def add_stopped(self, prefilled: int, reused: int, generated: int):
        """A turn whose answer Ctrl-C stopped: what it ran counts (no speed: it was cut)."""
        self.turns += 1
        self.stopped += 1
        self.prefilled += prefilled
        self.reused += reused
        self.generated += generated

    def line(self, used: int, capacity: int) -> str:
        timed = self.turns - self.stopped
        speed = (f", {(self.generated - timed) / self.decode_seconds:.1f} tok/s decode"
                 if self.decode_seconds else "")
        stopped = f", {self.stopped} stopped" if self.stopped else ""
        return (f"[this conversation: {self.turns} turn(s){stopped} | KV cache {used} of "
                f"{capacity} positions used "
                f"({100 * used / capacity:.0f}%) | prefilled {self.prefilled} tokens, reused "
                f"{self.reused} | generated {self.generated} tokens{speed}]")


def _stopped_early(r: GenerationResult, capacity: int, max_new_tokens: int) -> str | None:
    if r.stop_reason == "kv_cache_full":
        return (f"[the answer stopped: the KV cache is full ({capacity} positions); the next turn "
                f"drops the oldest turns, /reset starts afresh]")
    if r.stop_reason == "length":
        return f"[the answer stopped at --max-new-tokens {max_new_tokens}]"
    return None


class ChatLoop:
    def __init__(self, gen: Generator, sampling: SamplingConfig, max_new_tokens: int,
                 system: str | None = None, out=sys.stdout, speculate: str = "auto",
                 template_kwargs: dict | None = None, prefix_cache=None):
        """prefix_cache: a runtime.prefix_cache.PrefixCache with a store on disk (chat
        --prompt-cache): each turn's prompt is looked up there first and remembered after."""
        self.gen, self.sampling, self.max_new_tokens, self.out = gen, sampling, max_new_tokens, out
        self.prefix_cache = prefix_cache
        self.template_kwargs = template_kwargs or {}
        self.speculate = speculate
        self.system = system
        self.messages: list[dict] = []
        self.last: GenerationResult | None = None
        self.totals = Totals()

    def say(self, text: str = "", end: str = "\n"):
        print(text, end=end, file=self.out, flush=True)

    def _head(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _fit(self) -> list[int]:
        """Prompt ids of the conversation, dropping the oldest turns if it would overflow."""
        room = min(self.max_new_tokens, self.gen.engine.kv_cache_len // 4)
        dropped = 0
        while True:
            ids = self.gen.encode_chat(self._head() + self.messages, **self.template_kwargs)
            if len(ids) + room <= self.gen.engine.kv_cache_len or len(self.messages) <= 1:
                break
            self.messages = self.messages[2:]  # the oldest user turn and its answer
            dropped += 1
        if dropped:
            self.say(f"[the conversation outgrew the {self.gen.engine.kv_cache_len}-token KV "
                     f"cache: dropped the {dropped} oldest turn(s), kept the system prompt; "
                     f"--ctx-size N holds more]")
        return ids

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave."""
        name, _, arg = line.partition(" ")
        if name == "/exit":
            return False
        if name == "/reset":
            self.messages, self.totals, self.last = [], Totals(), None
            self.say("[conversation cleared]")
        elif name == "/system":
            self.system, self.messages = arg.strip() or None, []
            self.totals, self.last = Totals(), None
            self.say("[system prompt set, conversation cleared]")
        elif name == "/stats":
            engine = self.gen.engine
            self.say(self.totals.line(len(self.gen.cached_ids), engine.kv_cache_len))
            if self.last:
                self.say("last turn: " + _stats(self.last))
        else:
            self.say(HELP)
        return True

    def turn(self, text: str):
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []

        def show(piece):
            pieces.append(piece)
            self.say(piece, end="")

        ids, reused = [], 0
        try:
            ids = self._fit()
            reused = self.gen.reusable_prefix(ids)
            if self.prefix_cache is not None:
                self.prefix_cache.prepare(ids)
            self.last = self.gen.generate(ids, self.sampling, self.max_new_tokens,
                                          on_text=show, reuse_cache=True,
                                          speculate=self.speculate)
            if self.prefix_cache is not None:
                self.prefix_cache.remember(ids)
                self.prefix_cache.flush()
            self.say()
            self.totals.add(self.last)
            early = _stopped_early(self.last, self.gen.engine.kv_cache_len, self.max_new_tokens)
            if early:
                self.say(early)
            self.say(_stats(self.last))
            self.messages.append({"role": "assistant", "content": self.last.text})
        except KeyboardInterrupt:  # stop this answer, keep what was said, stay in the chat
            # a decision: the answer so far stays in the conversation (the next turn sees it,
            # as a chat page that keeps a stopped answer on screen does) and counts in /stats
            ran = min(len(self.gen.cached_ids), len(ids))
            generated = max(0, len(self.gen.cached_ids) - len(ids))
            self.totals.add_stopped(max(0, ran - reused), min(reused, ran), generated)
            self.say(f"\n[stopped after {generated} token(s): the answer so far stays in the "
                     f"conversation; /reset clears it]")
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
        except EdgeLLMError as e:
            self.messages.pop()
            self.say(f"[error: {e}]")

    def run(self, read=input):
        self.say(HELP)
        while True:
            try:
                line = read("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                self.say()
                return
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.turn(line)
