"""TTFT of an agent loop's second turn with a 500-token system prompt, with and without the
prefix (KV) cache.

    python benchmarks/agent_ttft.py ~/.cache/edgellm/artifacts/qwen2.5-coder-0.5b-instruct-s8
"""

from __future__ import annotations

import argparse
import statistics

from edgellm.runtime.generator import Generator
from edgellm.runtime.sampler import SamplingConfig

TOOLS_TEXT = ("You are an agent with tools. Before acting, think about which tool fits, call it "
              "with valid JSON arguments, read its result, and answer briefly. ")


def system_prompt(gen: Generator, tokens: int) -> str:
    text = ""
    while len(gen.tokenizer.encode(text, add_special_tokens=False).ids) < tokens:
        text += TOOLS_TEXT
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    gen = Generator.load(a.artifact, threads=a.threads)
    system = {"role": "system", "content": system_prompt(gen, a.system_tokens)}
    first = [system, {"role": "user", "content": "Find the weather in Paris."}]
    second = [system, {"role": "user", "content": "Now find the weather in Rome."}]
    ttft = {}
    for reuse in (False, True):
        times = []
        for _ in range(a.repeats):
            gen.generate(gen.encode_chat(first), SamplingConfig(), 8, reuse_cache=reuse)
            r = gen.generate(gen.encode_chat(second), SamplingConfig(), 8, reuse_cache=reuse)
            times.append(r.ttft_ms)
        ttft[reuse] = statistics.median(times)
        print(f"prefix cache {'on ' if reuse else 'off'}: second-turn TTFT {ttft[reuse]:.0f} ms "
              f"(prompt {r.prompt_tokens} tokens, {r.reused_tokens} reused)")
    print(f"speed-up {ttft[False] / ttft[True]:.1f}x")


if __name__ == "__main__":
    main()
