"""A home hub's prompt (devices with their states, intent tools) through edgellm's prompt caches,
beside llama.cpp on the same model: for prompts of about 1K, 3K and 8K tokens, the time to the
first token cold, warm (in memory), with one device's state changed in the middle (in memory),
after a restart (from disk), changed after a restart, and decode speed at that depth. The figures
in docs/PERFORMANCE.md, "A smart home's prompt".

"After a restart" is timed twice: in this process (a new engine over the same --prompt-cache
directory: in_process_after_restart) and, as a hub meets it, through a real `edgellm serve`
process stopped and started again, the request streamed with its tools over HTTP ("edgellm
serve": cold, after_restart, changed_after_restart; --no-serve leaves it out).

    python benchmarks/prompt_cache.py ART [--sizes 1000,3000,8000] [--kernel auto]
                                          [--threads 2] [--llama-cpp GGUF]
    python benchmarks/prompt_cache.py ART --quality    # what moving K/V past a change costs

Each size runs ART at --ctx-size (prompt + 128, no rebuild); "a restart" is a new engine over the
same --prompt-cache directory (a fresh temporary one per size), in this process. --llama-cpp GGUF: the same
phases with llama.cpp (llama-cpp-python, built as compare_llamacpp.py says) on the same token
ids: warm and changed on one Llama (it reuses the longest common prefix), after a restart its
state saved with save_state() and read back by a fresh Llama; e.g. the Q8_0 that
compare_llamacpp.py makes. Answers: greedy, 32 tokens; "same" compares with a cold run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "hall", "office", "garage", "garden"]
KINDS = [("light", "on", "off"), ("switch", "on", "off"), ("cover", "open", "closed"),
         ("sensor", "21.5 °C", "19.0 °C"), ("lock", "locked", "unlocked"),
         ("media_player", "playing", "idle")]
TOOLS = ["HassTurnOn", "HassTurnOff", "HassLightSet", "HassSetPosition", "HassMediaPause",
         "HassMediaUnpause", "HassGetState", "HassClimateSetTemperature"]
TOKENS_PER_DEVICE, BASE_TOKENS = 27.7, 680  # Qwen2.5's tokenizer; BASE: preamble and tools


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



ANSWER = 32
QUESTIONS = ["Turn on the kitchen light 0.", "Turn off the hall switch 4.",
             "Is the garage door open?"]


def _messages(system: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def _prompts(art: str, devices: int) -> tuple[dict, int]:
    """The token ids of each phase's prompt, and the context that holds the longest + answer."""
    from edgellm.artifact.reader import load_artifact
    from edgellm.text import ModelText

    system, tools = hub_prompt(devices)
    changed = hub_prompt(devices, changed=devices // 2)[0]
    text = ModelText.from_artifact(load_artifact(art))
    encode = lambda s, q: text.encode_chat(_messages(s, q), tools=tools)  # noqa: E731
    ids = {"cold": encode(system, QUESTIONS[0]), "warm": encode(system, QUESTIONS[1]),
           "changed": encode(changed, QUESTIONS[0]),
           "after_restart": encode(system, QUESTIONS[2]),
           "changed_after_restart": encode(changed, QUESTIONS[1])}
    return ids, max(map(len, ids.values())) + ANSWER + 96


def edgellm_phases(art: str, ids: dict, ctx: int, kernel: str, threads: int,
                   check: bool) -> dict:
    """First-token seconds per phase (cache lookup, moves and prefill included), the decode
    speed at that depth, and whether the changed prompt answers as a cold run does."""
    from edgellm.runtime.cache_reuse import MIN_RUN
    from edgellm.runtime.generator import Generator
    from edgellm.runtime.prefix_cache import PrefixCache
    from edgellm.runtime.prompt_store import open_store
    from edgellm.runtime.sampler import SamplingConfig

    rows, answers = {}, {}
    with tempfile.TemporaryDirectory() as d:
        def load():
            gen = Generator.load(art, threads=threads, kernel=kernel, ctx_size=ctx)
            return gen, PrefixCache(gen, slots=4, store=open_store(gen, d, 8 << 30),
                                    reuse=MIN_RUN)

        gen, cache = load()
        for phase in ("cold", "warm", "changed", "after_restart", "changed_after_restart"):
            if phase in ("after_restart", "changed_after_restart"):
                gen, cache = load()  # a new engine in this process (serve_phases: a real one)
            moved = cache.moved
            t = time.perf_counter()
            cache.prepare(ids[phase])
            r = gen.generate(ids[phase], SamplingConfig(), ANSWER, reuse_cache=True)
            key = f"in_process_{phase}" if "restart" in phase else phase
            rows[f"{key}_ttft_s"] = round(time.perf_counter() - t - _after_first(r), 3)
            if cache.moved > moved:  # K/V moved past the change (the change itself computed)
                rows[f"{phase}_moved"] = cache.moved - moved
            answers[phase] = r.token_ids
            if phase == "cold":
                rows["decode_tok_s"] = r.decode_tok_s
            cache.remember(ids[phase])
            cache.flush()
    if check:  # the changed prompt, cold: the answer the caches must give
        cold = Generator.load(art, threads=threads, kernel=kernel, ctx_size=ctx)
        want = cold.generate(ids["changed"], SamplingConfig(), ANSWER).token_ids
        rows["changed_same_answer"] = answers["changed"] == want
    return rows


def serve_phases(art: str, devices: int, ctx: int, kernel: str, threads: int) -> dict:
    """What a hub sees: a real `edgellm serve` process (its defaults: --parallel as memory
    allows, tool grammars) over an empty --prompt-cache directory, the hub's streamed request
    with its tools (cold), stopped with SIGINT and started again (a real restart), then the
    first request of the new process (after_restart) and one with a device's state changed
    (changed_after_restart). First-token seconds as the client sees them (the first delta of
    text or of a call), and each start's seconds until the server listens."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    system, tools = hub_prompt(devices)
    changed = hub_prompt(devices, changed=devices // 2)[0]
    name = os.path.basename(os.path.normpath(art))
    rows = {}

    def start(directory):
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", art, "--port",
                                 "0", "--prompt-cache", directory, "--ctx-size", str(ctx),
                                 "--threads", str(threads), "--kernel", kernel, "--quiet"],
                                stderr=subprocess.PIPE, text=True)
        url = None
        for line in proc.stderr:
            if "OpenAI API" in line:
                url = line.split()[2][:-len("/v1")]
            if "Ctrl-C stops" in line:
                break
        if url is None:
            raise SystemExit(f"serve did not start: {proc.wait()}")
        return proc, url, time.perf_counter() - t

    def first_token(url, system_text, question):
        body = {"model": name, "messages": _messages(system_text, question), "tools": tools,
                "stream": True, "max_tokens": ANSWER, "temperature": 0}
        req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        t, first = time.perf_counter(), None
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if first is None and line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                    if delta.get("content") or delta.get("tool_calls"):
                        first = time.perf_counter() - t
        return first

    def stop(proc):
        proc.send_signal(signal.SIGINT)
        proc.wait(60)

    with tempfile.TemporaryDirectory() as d:
        proc, url, rows["start_s"] = start(d)
        try:
            rows["cold_ttft_s"] = first_token(url, system, QUESTIONS[0])
        finally:
            stop(proc)
        proc, url, rows["restart_start_s"] = start(d)
        try:
            rows["after_restart_ttft_s"] = first_token(url, system, QUESTIONS[2])
            rows["changed_after_restart_ttft_s"] = first_token(url, changed, QUESTIONS[1])
        finally:
            stop(proc)
    rows = {k: round(v, 3) for k, v in rows.items()}
    rows["after_restart_of_cold"] = round(rows["after_restart_ttft_s"] / rows["cold_ttft_s"], 3)
    return rows


def _after_first(r) -> float:
    """Seconds of a result after its first token (its decode)."""
    return (len(r.token_ids) - 1) / r.decode_tok_s if r.decode_tok_s else 0.0


def llama_cpp_phases(gguf: str, ids: dict, ctx: int, threads: int) -> dict:
    """The same phases on llama.cpp: one Llama for cold, warm and changed (it keeps the longest
    common prefix of its last prompt), its state saved to a file and read by a fresh Llama for
    the phases after a restart."""
    import pickle

    from llama_cpp import Llama

    def fresh():
        return Llama(gguf, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                     verbose=False)

    def first_token(llm, prompt):
        t = time.perf_counter()
        stream = llm.create_completion(prompt, max_tokens=ANSWER, temperature=0, stream=True)
        first, pieces = None, []
        for chunk in stream:
            first = first or time.perf_counter()
            pieces.append(chunk["choices"][0]["text"])
        end = time.perf_counter()
        return first - t, (len(pieces) - 1) / (end - first), "".join(pieces)

    rows = {}
    llm = fresh()
    for phase in ("cold", "warm", "changed"):
        rows[f"{phase}_ttft_s"], speed, _ = first_token(llm, ids[phase])
        if phase == "cold":
            rows["decode_tok_s"] = round(speed, 2)
            with tempfile.NamedTemporaryFile(suffix=".state", delete=False) as f:
                pickle.dump(llm.save_state(), f)
                state = f.name
    for phase in ("after_restart", "changed_after_restart"):
        t = time.perf_counter()
        llm = fresh()
        with open(state, "rb") as f:
            llm.load_state(pickle.load(f))
        loading = time.perf_counter() - t
        first, _, _ = first_token(llm, ids[phase])
        rows[f"{phase}_ttft_s"] = loading + first
    import os

    os.unlink(state)
    return {k: round(v, 3) for k, v in rows.items()}


def quality(art: str, devices: int, kernel: str, threads: int) -> list[dict]:
    """What moving K/V past a change costs: per kind of change, the logits over a cold run's
    greedy answer (teacher-forced) from the cache with runs moved, against a cold run's; beside
    them the same from the prefix alone (the rest prefilled from the change: other chunk
    boundaries than the cold run's), which shows what prefilling in other chunks moves."""
    import numpy as np

    from edgellm.runtime.cache_reuse import MIN_RUN
    from edgellm.runtime.generator import Generator
    from edgellm.runtime.prefix_cache import PrefixCache
    from edgellm.runtime.sampler import SamplingConfig

    system, tools = hub_prompt(devices)
    names = system.split("\n- names: ")
    added = "\n- names: ".join(names[:40] + ["Porch light 99\n  domain: light\n  state: 'on'\n"
                                              "  areas: Porch"] + names[40:])
    kinds = {"one state changed (middle)": hub_prompt(devices, changed=devices // 2)[0],
             "one state changed (near the start)": hub_prompt(devices, changed=3)[0],
             "a device added (middle)": added,
             "a device removed (middle)": "\n- names: ".join(names[:40] + names[41:])}
    gen = Generator.load(art, threads=threads, kernel=kernel, ctx_size=4096)
    encode = lambda s: gen.encode_chat(_messages(s, QUESTIONS[0]), tools=tools)  # noqa: E731
    old = encode(system)
    rows = []
    for kind, text in kinds.items():
        new = encode(text)
        gen.cached_ids = []
        cold = gen.generate(new, SamplingConfig(), ANSWER)
        answer = [new[-1]] + cold.token_ids[:-1]
        ref = gen.engine.forward(answer, len(new) - 1, all_logits=True)
        row = {"change": kind, "prompt_tokens": len(new),
               "at": next(i for i, (x, y) in enumerate(zip(old, new)) if x != y)}
        for reuse in (0, MIN_RUN):
            gen.cached_ids = []
            gen.generate(old, SamplingConfig(), 1)
            cache = PrefixCache(gen, slots=0, reuse=reuse)
            cache.prepare(new)
            got = gen.generate(new, SamplingConfig(), ANSWER, reuse_cache=True)
            ours = gen.engine.forward(answer, len(new) - 1, all_logits=True)
            diff = np.abs(ours - ref).max(-1) / np.abs(ref).max(-1)
            name = "moved" if reuse else "prefix_only"
            row[f"{name}_tokens_moved"] = cache.moved
            row[f"{name}_same_answer"] = got.token_ids == cold.token_ids
            row[f"{name}_top1_agree"] = float((ours.argmax(-1) == ref.argmax(-1)).mean())
            row[f"{name}_max_rel_logit_diff"] = round(float(diff.max()), 4)
            row[f"{name}_median_rel_logit_diff"] = round(float(np.median(diff)), 4)
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--sizes", default="1000,3000,8000",
                   help="prompt sizes in tokens, about (devices are added to reach them)")
    p.add_argument("--kernel", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check-up-to", type=int, default=3500, metavar="N",
                   help="check the changed prompt's answer against a cold run up to N tokens")
    p.add_argument("--llama-cpp", metavar="GGUF", help="the same phases with llama.cpp")
    p.add_argument("--no-serve", action="store_true",
                   help="leave out the real serve process restarted (serve_phases)")
    p.add_argument("--quality", action="store_true",
                   help="instead: what moving K/V past a change costs, per kind of change, on a "
                        "3,000-token prompt (teacher-forced logits against a cold run)")
    a = p.parse_args()
    if a.quality:
        for row in quality(a.artifact, 84, a.kernel, a.threads):
            print(json.dumps(row), flush=True)
        return 0
    for size in map(int, a.sizes.split(",")):
        devices = max(4, round((size - BASE_TOKENS) / TOKENS_PER_DEVICE))
        ids, ctx = _prompts(a.artifact, devices)
        row = {"size": size, "devices": devices, "prompt_tokens": len(ids["cold"]),
               "edgellm": edgellm_phases(a.artifact, ids, ctx, a.kernel, a.threads,
                                         len(ids["cold"]) <= a.check_up_to)}
        if not a.no_serve:
            row["edgellm serve"] = serve_phases(a.artifact, devices, ctx, a.kernel, a.threads)
        if a.llama_cpp:
            row["llama.cpp"] = llama_cpp_phases(a.llama_cpp, ids, ctx, a.threads)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
