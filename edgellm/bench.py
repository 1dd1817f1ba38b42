"""`edgellm bench`: the seed's performance table, re-measured on this machine for one artifact."""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from edgellm.artifact.inspect import layout_label
from edgellm.errors import EdgeLLMError
from edgellm.runtime import roofline
from edgellm.runtime.context import more_context

_TEXT = ("The edge device reads every weight once per generated token, so decoding speed is set "
         "by memory bandwidth, while the prompt is processed as matrix products. ")


def parameter_count(cfg) -> int:
    d, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, \
        cfg.num_kv_heads * cfg.head_dim
    layer = d * (q + 2 * kv) + q * d + 3 * d * i + 2 * d + (q + 2 * kv if cfg.qkv_bias else 0)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + cfg.num_layers * layer + d + head


def _prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(_TEXT, add_special_tokens=False).ids
    return (ids * (n // len(ids) + 1))[:n]


def _one_pass(gen, prompt: list[int], gen_tokens: int) -> tuple[float, float, float]:
    """(prefill seconds, ttft seconds, decode tok/s): greedy, never stopping early."""
    t0 = time.perf_counter()
    logits = gen.prefill(prompt)
    t_prefill = time.perf_counter()
    token = int(np.argmax(logits))
    t_first = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + gen_tokens - 1):
        token = int(np.argmax(gen.engine.forward([token], pos)))
    t_end = time.perf_counter()
    return t_prefill - t0, t_first - t0, (gen_tokens - 1) / max(t_end - t_first, 1e-9)


def _answers(gen, prompt: str, gen_tokens: int, repeats: int, speculate: str) -> dict:
    """Greedy answers to a user message: plain decode and, unless speculate is "off",
    speculative decode, alternating in one run; medians."""
    from edgellm.runtime.sampler import SamplingConfig

    ids = gen.encode_chat([{"role": "user", "content": prompt}])
    if len(ids) + gen_tokens > gen.engine.kv_cache_len:
        raise EdgeLLMError(f"the prompt file's {len(ids)} tokens + --gen-tokens {gen_tokens} "
                           f"exceed the KV cache of {gen.engine.kv_cache_len}: "
                           f"{more_context(gen.engine.config, len(ids) + gen_tokens)}")
    modes = ["off"] + ([speculate] if speculate != "off" else [])
    gen.generate(ids[:8], SamplingConfig(), 4)  # warm-up
    runs: dict[str, list] = {m: [] for m in modes}
    for i in range(repeats):
        for m in modes:
            _progress(f"bench: run {i + 1} of {repeats}, speculation {m} ...")
            runs[m].append(gen.generate(ids, SamplingConfig(), gen_tokens, speculate=m))
    _progress("")
    plain = runs["off"]
    out = {"prompt_tokens": len(ids), "answer_tokens": len(plain[0].token_ids),
           "prefill_tok_s": statistics.median(r.prefill_tok_s for r in plain),
           "ttft_ms": statistics.median(r.ttft_ms for r in plain),
           "decode_tok_s": statistics.median(r.decode_tok_s for r in plain)}
    if speculate != "off":
        spec = runs[speculate]
        s = spec[0].speculation
        out.update(speculate=speculate,
                   speculative_decode_tok_s=statistics.median(r.decode_tok_s for r in spec),
                   tokens_per_forward=round(len(spec[0].token_ids) / max(s.forwards, 1), 2),
                   draft_proposed=s.proposed, draft_accepted=s.accepted,
                   same_answer=spec[0].token_ids == plain[0].token_ids)
        out["speedup"] = round(out["speculative_decode_tok_s"] / max(out["decode_tok_s"], 1e-9), 2)
    return out


def _progress(text: str) -> None:
    """One line that rewrites itself on a terminal's stderr (nothing elsewhere); "" clears it."""
    import sys

    if sys.stderr.isatty():
        print(f"\r\033[K{text}", end="" if text else "\r", file=sys.stderr, flush=True)


def bench(artifact: str, prompt_tokens: int = 128, gen_tokens: int = 128, repeats: int = 3,
          engine: str = "auto", threads: int | None = None,
          providers: list[str] | None = None, allow_slow_kernels: bool = False,
          prompt: str | None = None, speculate: str = "off", kernel: str = "auto",
          ctx_size: int | None = None, cache_type: str = "fp32") -> dict:
    """The fixed-prompt measurement, or with `prompt` (a user message) its greedy answer, plain
    and with `speculate`."""
    from edgellm.machine import warn_if_busy
    from edgellm.runtime.generator import Generator

    warn_if_busy(threads, "bench measures")
    gen = Generator.load(artifact, engine=engine, threads=threads, providers=providers,
                         allow_slow_kernels=allow_slow_kernels, kernel=kernel, ctx_size=ctx_size,
                         cache_type=cache_type)
    if prompt_tokens + gen_tokens > gen.engine.kv_cache_len:
        raise EdgeLLMError(f"--prompt-tokens + --gen-tokens = {prompt_tokens + gen_tokens} "
                           f"exceeds the KV cache of {gen.engine.kv_cache_len}: "
                           f"{more_context(gen.engine.config, prompt_tokens + gen_tokens)}")
    if prompt_tokens < 1 or gen_tokens < 2:
        raise EdgeLLMError("bench needs --prompt-tokens >= 1 and --gen-tokens >= 2")
    m = gen.artifact.manifest
    about = {
        "model": gen.artifact.path.name,
        "source": m.source.get("path", "").rsplit("/", 1)[-1],
        "params": parameter_count(gen.artifact.config),
        "weight_type": layout_label(m.weight_scheme, m.post_scheme, bool(m.layer_schemes)),
        # the path of the 8-bit weights and why (runtime.kernels), noted once
        "engine": type(gen.engine).__name__ + (f" ({gen.engine.kernel.label()})"
                                               if hasattr(gen.engine, "kernel") else ""),
        "kernel": gen.engine.kernel.line() if hasattr(gen.engine, "kernel") else None,
        "cache_type": getattr(gen.engine, "cache_type", "fp32"),
        "threads": gen.engine.threads,  # as used: ORT's pool size; numpy: None (BLAS default)
        "context": gen.engine.kv_cache_len,
    }
    if prompt is not None:
        return {**about, "gen_tokens": gen_tokens, "repeats": repeats,
                **_answers(gen, prompt, gen_tokens, repeats, speculate),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    prompt = _prompt_ids(gen.tokenizer, prompt_tokens)
    _one_pass(gen, prompt[:8], 4)  # warm-up: sessions, thread pool, prepacked weights
    runs = []
    for i in range(repeats):
        _progress(f"bench: run {i + 1} of {repeats} (prefill {prompt_tokens}, decode "
                  f"{gen_tokens}) ...")
        runs.append(_one_pass(gen, prompt, gen_tokens))
    # before the probes: the bandwidth probe's buffer is as large as the weights
    peak_rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    _progress("bench: the machine's limits (read bandwidth, integer GEMM) ...")
    prefill = round(prompt_tokens / statistics.median(r[0] for r in runs), 2)
    decode = round(statistics.median(r[2] for r in runs), 2)
    limits = roofline.limits(gen.engine, threads, decode, prefill,
                             depth=prompt_tokens + gen_tokens // 2,
                             prefill_rows=min(prompt_tokens, gen.engine.prefill_len))
    _progress("")
    return {
        **about,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeats": repeats,
        "prefill_tok_s": prefill,
        "ttft_ms": round(statistics.median(r[1] for r in runs) * 1000, 2),
        "decode_tok_s": decode,
        "peak_rss_mb": peak_rss,
        **limits,
    }


def markdown(r: dict) -> str:
    if "answer_tokens" in r:
        return _answer_markdown(r)
    return "\n".join([
        "| model | params | weight type | engine | threads | prefill tok/s | decode tok/s "
        "| TTFT | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['weight_type']} | {r['engine']} "
        f"| {r['threads'] or 'BLAS default'} | {r['prefill_tok_s']:.1f} ({r['prompt_tokens']} tokens) "
        f"| {r['decode_tok_s']:.1f} | {r['ttft_ms']:.0f} ms | {r['peak_rss_mb']:.0f} MB |",
    ] + ([f"\nkernel: {r['kernel']}"] if r.get("kernel") else [])
      + ([f"context: {r['context']} positions"
          + (f", {r['cache_type']} KV cache" if r.get("cache_type", "fp32") != "fp32" else "")]
         if r.get("context") else [])
      + _limit_lines(r))


def _limit_lines(r: dict) -> list[str]:
    """Each speed beside its physical limit on this machine (runtime.roofline)."""
    if "roofline_tok_s" not in r:
        return []
    threads = r["threads"] or "all"
    lines = [f"decode: {r['decode_of_roofline']:.0%} of its roofline, {r['roofline_tok_s']:.1f} "
             f"tok/s = {r['read_bandwidth_gb_s']:.1f} GB/s read (measured here, {threads} "
             f"thread{'' if threads == 1 else 's'}) / {r['bytes_per_token'] / 1e6:.0f} MB a token"]
    if "int8_gemm_gops" in r:
        m, k, n = r["int8_gemm_shape"]
        lines.append(f"prefill: {r['prefill_gops']:.0f} GOPS in the layers' matmuls, "
                     f"{r['prefill_of_gemm']:.0%} of ONNX Runtime's integer GEMM here "
                     f"({r['int8_gemm_gops']:.0f} GOPS on {m}x{k} by {k}x{n})")
    return lines


def _answer_markdown(r: dict) -> str:
    head = (f"{r['model']} ({r['weight_type']}, {r['engine']}, {r['threads'] or 'BLAS default'} "
            f"threads): a {r['prompt_tokens']}-token prompt, {r['answer_tokens']}-token greedy "
            f"answer, medians of {r['repeats']}")
    rows = ["| decode | tok/s | tokens per forward | drafts accepted |", "|---|---|---|---|",
            f"| plain | {r['decode_tok_s']:.1f} | 1 | |"]
    if "speculate" in r:
        rows.append(f"| speculative ({r['speculate']}) | {r['speculative_decode_tok_s']:.1f} "
                    f"| {r['tokens_per_forward']:.2f} | {r['draft_accepted']}/{r['draft_proposed']} |")
        rows.append(f"\nspeedup {r['speedup']:.2f}x; same answer as plain: "
                    f"{'yes' if r['same_answer'] else 'no (a near tie: different kernels)'}")
    tail = [f"\nkernel: {r['kernel']}"] if r.get("kernel") else []
    return "\n".join([head, ""] + rows + tail)
