"""Prompt in, streamed text out: chunked prefill, decode over the KV cache, sampling, timings."""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgellm.artifact.reader import Artifact, load_artifact
from edgellm.errors import EdgeLLMError
from edgellm.machine import give_back_freed_memory
from edgellm.runtime.engine import NumpyEngine
from edgellm.runtime.sampler import Sampler, SamplingConfig
from edgellm.runtime.speculative import SpeculationStats, drafter
from edgellm.text import ModelText, TextStream


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    stop_reason: str  # "eos" | "length" | "stop" | "cancelled" | "kv_cache_full"
    reused_tokens: int = 0  # prompt tokens whose K/V came from the previous call
    speculation: SpeculationStats | None = None  # with speculative decoding

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("text", "token_ids", "prompt_tokens", "ttft_ms",
                                              "prefill_tok_s", "decode_tok_s", "stop_reason",
                                              "reused_tokens")}
        if self.speculation:
            out["speculation"] = self.speculation.to_json()
        return out


# auto drafts only where each further row of a forward costs less than this share of a
# one-row forward (else a verify of k drafts costs about k decode steps, and even drafts
# accepted whole would buy little)
ROW_COST_LIMIT = 0.7


def verifies_pay(engine) -> bool:
    """Whether a several-row forward is cheap enough here for drafts to pay, from the timings
    the engine's kernel choice measured (runtime.kernels); unmeasured: assumed so."""
    cost = getattr(engine, "row_cost", lambda: None)()
    return cost is None or cost < ROW_COST_LIMIT


class DamagedModel(EdgeLLMError):
    """The artifact computes garbage (non-finite logits)."""


ENGINES = ("auto", "ort", "numpy")


def make_engine(artifact: Artifact, engine: str = "auto", threads: int | None = None,
                providers: list[str] | None = None, allow_slow_kernels: bool = False,
                kernel: str = "auto", slots: int = 1, ctx_size: int | None = None,
                cache_type: str = "fp32"):
    """`ort` (ONNX Runtime graphs), `numpy` (the reference), or `auto`: ort when the artifact
    has graphs. ctx_size: the KV cache's positions (runtime.context; default the artifact's).
    cache_type: fp32, or int8 (runtime.kv_quant; the ort engine's)."""
    from edgellm.runtime.context import context_length
    from edgellm.runtime.kv_quant import check

    if engine not in ENGINES:
        raise EdgeLLMError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    check(cache_type)
    context = context_length(artifact, ctx_size, slots, cache_type=cache_type)
    if engine == "numpy" or (engine == "auto" and not artifact.manifest.graphs):
        if cache_type != "fp32":
            raise EdgeLLMError(f"--cache-type {cache_type} runs on the ONNX Runtime engine; "
                               f"the numpy reference holds its cache in "
                               f"{artifact.manifest.hidden_state_type}"
                               + ("" if artifact.manifest.graphs else
                                  f" ({artifact.path} has no ONNX graphs)"))
        if threads:
            _limit_blas_threads(threads)
        numpy_engine = NumpyEngine(artifact, slots, context)
        numpy_engine.threads = threads  # None: the BLAS library's own default
        return numpy_engine
    from edgellm.runtime.ort_engine import OrtEngine

    return OrtEngine(artifact, threads=threads or physical_cores(), providers=providers,
                     allow_slow_kernels=allow_slow_kernels, kernel=kernel, slots=slots,
                     context=context, cache_type=cache_type)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyperthreads do not speed up a
    bandwidth-bound decode, and ONNX Runtime's own default is one thread per core)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count()
                                                                                   or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _limit_blas_threads(threads: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(threads)


class Generator:
    """An artifact ready to chat: its engine and the decode loop over token ids, with the
    model's text interface (edgellm.text: tokenizer, chat template, end-of-turn ids) beside."""

    def __init__(self, artifact: Artifact, engine: str = "auto", threads: int | None = None,
                 providers: list[str] | None = None, allow_slow_kernels: bool = False,
                 kernel: str = "auto", slots: int = 1, ctx_size: int | None = None,
                 cache_type: str = "fp32"):
        self.artifact = artifact
        self.text = ModelText.from_artifact(artifact)
        self.tokenizer, self.template = self.text.tokenizer, self.text.template
        self.eos_ids = self.text.eos_ids
        self.engine = make_engine(artifact, engine, threads, providers, allow_slow_kernels, kernel,
                                  slots, ctx_size, cache_type)
        self.cached_ids: list[int] = []  # tokens whose K/V sit at positions 0.. of the cache

    def for_engine(self, engine) -> "Generator":
        """This model's text interface and decode loop over another engine (one slot of a
        batched engine: runtime.batch), with a cache of its own."""
        other = copy.copy(self)
        other.engine, other.cached_ids = engine, []
        return other

    @classmethod
    def load(cls, path: str | Path, verify: bool = False, **engine_opts) -> "Generator":
        return cls(load_artifact(path, verify=verify), **engine_opts)

    def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        return self.text.encode_chat(messages, **template_kwargs)

    def _check_fits(self, n_prompt: int):
        limit = self.engine.kv_cache_len
        if n_prompt >= limit:
            from edgellm.runtime.context import more_context

            raise EdgeLLMError(
                f"the prompt has {n_prompt} tokens but the KV cache holds {limit} positions "
                f"(it must leave room for at least one new token): "
                f"{more_context(self.engine.config, n_prompt)}")
        if n_prompt == 0:
            raise EdgeLLMError("the prompt is empty")

    def prefill(self, ids: list[int], pos: int = 0, cancelled: Callable[[], bool] | None = None):
        """Feed ids at positions pos.. in chunks of prefill_len; logits of the last position
        (None when `cancelled` said so before a chunk)."""
        step = self.engine.prefill_len
        logits = None
        del self.cached_ids[pos:]
        # (a slot of a batched engine schedules the chunks as one prompt: runtime.batch)
        with getattr(self.engine, "prefilling", contextlib.nullcontext)():
            for start in range(0, len(ids), step):
                if cancelled and cancelled():
                    return None
                chunk = ids[start:start + step]
                logits = self._checked(self.engine.forward(chunk, pos + start), pos + start)
                self.cached_ids.extend(chunk)
        if len(ids) >= step:  # a prompt's activations, freed, out of the process
            give_back_freed_memory()
        return logits

    def _checked(self, logits, pos: int):
        """Logits as they are, or an error when they are not numbers (damaged weights answer
        NaN, and argmax would turn that into token 0 with no complaint)."""
        if not np.isfinite(logits).all():
            raise DamagedModel(f"the model computed non-finite logits (NaN or inf) at position "
                               f"{pos}: the artifact {self.artifact.path} looks damaged; check "
                               f"it with `edgellm inspect {self.artifact.path} --verify`")
        return logits

    def reusable_prefix(self, prompt_ids: list[int]) -> int:
        """How many leading prompt tokens already sit in the KV cache (at most all but one:
        the last prompt token must run to give the first logits)."""
        n = 0
        for a, b in zip(self.cached_ids, prompt_ids[:-1]):
            if a != b:
                break
            n += 1
        return n

    @staticmethod
    def _emit(text: str, emitted: int, stop: tuple[str, ...], on_text) -> int:
        """Hand out text[emitted:], holding back a tail that may be the start of a stop string."""
        hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        end = len(text) - hold
        if end > emitted:
            on_text(text[emitted:end])
        return max(end, emitted)

    def generate(self, prompt_ids: list[int], sampling: SamplingConfig, max_new_tokens: int = 256,
                 on_text: Callable[[str], None] | None = None, reuse_cache: bool = False,
                 stop: tuple[str, ...] = (), cancelled: Callable[[], bool] | None = None,
                 mask=None, speculate: str = "off") -> GenerationResult:
        """Sample up to max_new_tokens after prompt_ids. With reuse_cache, the prompt's prefix
        that the previous call left in the KV cache is not computed again. `mask` (a
        chat.constrained.TokenMask) limits each step to the tokens its grammar allows.
        `speculate` "lookup"/"auto" drafts tokens by prompt lookup (runtime.speculative) and
        verifies them in one forward: the same tokens as plain decoding (greedy), or the same
        distribution (sampling)."""
        self._check_fits(len(prompt_ids))
        lookup = drafter(speculate)
        if speculate == "auto" and not verifies_pay(self.engine):
            lookup = None  # a forward of k rows costs about k of one row here: plain decode
        sampler, stream = Sampler(sampling), TextStream(self.tokenizer)
        stats = SpeculationStats()
        history = list(prompt_ids)
        if lookup:
            lookup.extend(history)
        reused = self.reusable_prefix(prompt_ids) if reuse_cache else 0
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids[reused:], reused, cancelled)
        t_prefill = time.perf_counter()
        pos, generated, reason = len(prompt_ids), [], "length"
        t_first, decoded, text, emitted, exclude = None, 0, "", 0, None
        if logits is None:  # cancelled before or during the prefill
            max_new_tokens, reason = 0, "cancelled"

        def choose(logits):
            return sampler(mask.apply(logits) if mask is not None else logits, history, exclude)

        def take(token) -> str | None:
            """Emit one token; the reason to stop after it, if any."""
            nonlocal text, emitted
            if mask is not None:
                mask.advance(token)
            if token in self.eos_ids:
                return "eos"
            generated.append(token)
            history.append(token)
            if lookup:
                lookup.extend([token])
            text += stream.push(token)
            cut = min((text.index(s) for s in stop if s in text), default=None)
            if cut is not None:
                text = text[:cut]
            if on_text:
                emitted = self._emit(text, emitted, stop if cut is None else (), on_text)
            if cut is not None:
                return "stop"
            if len(generated) >= max_new_tokens:
                return "length"
            if cancelled and cancelled():
                return "cancelled"
            if pos >= self.engine.kv_cache_len:
                return "kv_cache_full"
            return None

        while len(generated) < max_new_tokens:
            token = choose(logits)
            t_first = t_first or time.perf_counter()
            if (why := take(token)) is not None:
                reason = why
                break
            room = self.engine.kv_cache_len - pos - 1
            drafting = lookup and getattr(self.engine, "drafts_welcome", lambda: True)()
            draft = lookup.propose(min(room, max_new_tokens - len(generated))) if drafting \
                else []
            rows = self._checked(self.engine.forward([token] + draft, pos,
                                                     all_logits=bool(draft)), pos)
            rows = rows.reshape(len(draft) + 1, -1)
            self.cached_ids.append(token)
            pos, decoded, stats.forwards, exclude = pos + 1, decoded + 1, stats.forwards + 1, None
            accepted, why = 0, None
            for i, d in enumerate(draft):
                masked = mask.apply(rows[i]) if mask is not None else rows[i]
                if not sampler.accepts(masked, history, d):
                    exclude = d  # sampling draws the next token without it
                    break
                accepted += 1
                self.cached_ids.append(d)
                pos, decoded = pos + 1, decoded + 1
                if (why := take(d)) is not None:
                    break
            if draft:
                stats.proposed, stats.accepted = stats.proposed + len(draft), \
                    stats.accepted + accepted
                lookup.update(len(draft), accepted)
            if why is not None:
                reason = why
                break
            logits = rows[accepted]
        if on_text and emitted < len(text):
            on_text(text[emitted:])
        t_end = time.perf_counter()
        t_first = t_first or t_end
        n_prefilled = len(prompt_ids) - reused
        return GenerationResult(
            text=text,
            token_ids=generated,
            prompt_tokens=len(prompt_ids),
            ttft_ms=round((t_first - t0) * 1000, 2),
            prefill_tok_s=round(n_prefilled / max(t_prefill - t0, 1e-9), 2),
            decode_tok_s=round(decoded / (t_end - t_first), 2) if decoded else 0.0,
            stop_reason=reason,
            reused_tokens=reused,
            speculation=stats if lookup else None,
        )
