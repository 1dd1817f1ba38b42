"""Cost of constrained tool-call decoding: the llguidance mask per token next to a decode step.

    python benchmarks/tool_mask_cost.py ~/.cache/edgellm/artifacts/qwen2.5-coder-0.5b-instruct-s8
"""

from __future__ import annotations

import argparse
import statistics
import time

from edgellm.chat.constrained import ToolCallGrammar
from edgellm.chat.tools import forced_prefix
from edgellm.runtime.generator import Generator
from edgellm.runtime.sampler import SamplingConfig

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"]}}},
]
CALL_REST = 'get_weather", "arguments": {"city": "Paris", "unit": "c"}}'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    gen = Generator.load(a.artifact, threads=a.threads)
    t0 = time.perf_counter()
    grammar = ToolCallGrammar.for_generator(gen)
    setup = time.perf_counter() - t0
    prefix = forced_prefix("required", TOOLS)
    costs = []
    for _ in range(5):
        mask, logits = grammar.mask_after(prefix, TOOLS), None
        for token in gen.tokenizer.encode(CALL_REST, add_special_tokens=False).ids:
            logits = gen.engine.forward([token], 0) if logits is None else logits
            t = time.perf_counter()
            mask.apply(logits)
            costs.append(time.perf_counter() - t)
            mask.advance(token)
    ids = gen.encode_chat([{"role": "user", "content": "Count from 1 to 100."}])
    step = 1000 / gen.generate(ids, SamplingConfig(), 64).decode_tok_s
    mask_ms = statistics.median(costs) * 1000
    print(f"grammar tokenizer setup (once per server): {setup:.2f} s")
    print(f"mask per token: median {mask_ms:.3f} ms, max {max(costs) * 1000:.2f} ms")
    print(f"decode step: {step:.2f} ms -> mask is {100 * mask_ms / step:.1f}% of a step")


if __name__ == "__main__":
    main()
