"""A home hub's prompt (devices with their states, intent tools) through the prompt cache on disk:
time to first token cold, after a restart (the prefix read from DIR), and whether the answers
agree. The figures in docs/PERFORMANCE.md, "A smart home's prompt after a restart".

    python benchmarks/prompt_cache.py ART [--devices 86] [--kernel auto] [--threads 2]
                                          [--llama-cpp GGUF]

--llama-cpp GGUF: the same phases with llama.cpp (llama-cpp-python, built as
compare_llamacpp.py says) on the same token ids, its state saved to a file with save_state() and
read back by a fresh Llama (its prompt cache); e.g. the Q8_0 that compare_llamacpp.py makes.

ART needs a KV cache longer than the prompt (build it with --kv-cache-len 4096). Each phase
loads the artifact anew (a restart); the cache directory is a fresh temporary one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "hall", "office", "garage", "garden"]
KINDS = [("light", "on", "off"), ("switch", "on", "off"), ("cover", "open", "closed"),
         ("sensor", "21.5 °C", "19.0 °C"), ("lock", "locked", "unlocked"),
         ("media_player", "playing", "idle")]
TOOLS = ["HassTurnOn", "HassTurnOff", "HassLightSet", "HassSetPosition", "HassMediaPause",
         "HassMediaUnpause", "HassGetState", "HassClimateSetTemperature"]


def hub_prompt(devices: int, changed: int | None = None) -> tuple[str, list[dict]]:
    """The system prompt a home hub sends (every exposed entity and its state) and its tools;
    `changed`: the index of one device whose state is flipped."""
    lines = ["You are a voice assistant for Home Assistant. Answer questions about the world "
             "truthfully. Answer in plain text. Keep it simple and to the point.",
             "An overview of the areas and the devices in this smart home:"]
    for i in range(devices):
        kind, a, b = KINDS[i % len(KINDS)]
        room = ROOMS[i % len(ROOMS)]
        state = b if (i % 3 == 0) != (i == changed) else a
        lines.append(f"- names: {room.title()} {kind.replace('_', ' ')} {i}\n"
                     f"  domain: {kind}\n  state: '{state}'\n  areas: {room.title()}")
    tools = [{"type": "function", "function": {
        "name": name, "description": f"{name[4:]} a device or entity in the home",
        "parameters": {"type": "object", "properties": {
            "name": {"type": "string"}, "area": {"type": "string"},
            "domain": {"type": "array", "items": {"type": "string"}}}}}} for name in TOOLS]
    return "\n".join(lines), tools


def ttft(art: str, messages, tools, store_dir: str | None, kernel: str, threads: int):
    """(first-token seconds, token ids of a short greedy answer, prompt tokens, reused) with a
    freshly loaded artifact."""
    from edgellm.runtime.generator import Generator
    from edgellm.runtime.prefix_cache import PrefixCache
    from edgellm.runtime.sampler import SamplingConfig
    from edgellm.runtime.prompt_store import open_store

    gen = Generator.load(art, threads=threads, kernel=kernel)
    ids = gen.encode_chat(messages, tools=tools)
    cache = None
    t = time.perf_counter()
    if store_dir:  # the prefix read from disk: part of the time to the first token
        cache = PrefixCache(gen, slots=0, store=open_store(gen, store_dir, 4 << 30))
        cache.prepare(ids)
    loading = time.perf_counter() - t
    result = gen.generate(ids, SamplingConfig(), 16, reuse_cache=cache is not None)
    first = loading + result.ttft_ms / 1000
    if cache:
        cache.remember(ids)
        cache.flush()
    return first, result.token_ids, len(ids), result.reused_tokens


def llama_cpp_phases(gguf: str, ids_a: list[int], ids_b: list[int], threads: int) -> dict:
    """llama.cpp's first token cold (prompt b), and after a restart with the state of prompt a
    saved to a file and loaded by a fresh instance (llama-cpp-python reuses the common prefix)."""
    import pickle

    from llama_cpp import Llama

    def fresh():
        return Llama(gguf, n_ctx=len(ids_b) + 64, n_threads=threads, n_threads_batch=threads,
                     n_batch=512, verbose=False)

    def first_token(llm, ids):
        t = time.perf_counter()
        out = llm.create_completion(ids, max_tokens=1, temperature=0)
        return time.perf_counter() - t, out["choices"][0]["text"]

    cold, cold_text = first_token(fresh(), ids_b)
    llm = fresh()
    first_token(llm, ids_a)
    with tempfile.NamedTemporaryFile(suffix=".state") as f:
        t = time.perf_counter()
        pickle.dump(llm.save_state(), f)
        f.flush()
        saved = time.perf_counter() - t
        del llm
        llm = fresh()
        t = time.perf_counter()
        f.seek(0)
        llm.load_state(pickle.load(f))
        loading = time.perf_counter() - t
    warm, warm_text = first_token(llm, ids_b)
    return {"llama_cold_ttft_s": round(cold, 3), "llama_after_restart_ttft_s":
            round(loading + warm, 3), "llama_state_save_s": round(saved, 3),
            "llama_ratio": round((loading + warm) / cold, 4), "llama_same_first_token":
            warm_text == cold_text}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--devices", type=int, default=86)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-cpp", metavar="GGUF", help="the same phases with llama.cpp")
    a = p.parse_args()
    system, tools = hub_prompt(a.devices)
    ask = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]  # noqa
    with tempfile.TemporaryDirectory() as d:
        cold = ttft(a.artifact, ask("Turn on the kitchen light 0"), tools, None, a.kernel,
                    a.threads)
        first = ttft(a.artifact, ask("Turn off the hall switch 4"), tools, d, a.kernel, a.threads)
        warm = ttft(a.artifact, ask("Turn on the kitchen light 0"), tools, d, a.kernel, a.threads)
    rows = {"prompt_tokens": cold[2], "cold_ttft_s": round(cold[0], 3),
            "first_with_cache_ttft_s": round(first[0], 3),
            "after_restart_ttft_s": round(warm[0], 3), "reused_tokens": warm[3],
            "ratio": round(warm[0] / cold[0], 4), "same_answer": warm[1] == cold[1]}
    if a.llama_cpp:
        from edgellm.runtime.generator import Generator

        gen = Generator.load(a.artifact, threads=1, kernel="matmulnbits")
        rows.update(llama_cpp_phases(
            a.llama_cpp, gen.encode_chat(ask("Turn off the hall switch 4"), tools=tools),
            gen.encode_chat(ask("Turn on the kitchen light 0"), tools=tools), a.threads))
    json.dump(rows, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
