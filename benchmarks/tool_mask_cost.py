"""Cost of constrained decoding: llguidance's mask per token next to a decode step, for a forced
tool call, the lazy grammar of tool_choice auto (free prose, code full of braces, a call) and a
response_format JSON schema; then decode speed with and without the lazy grammar, end to end.

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
ANSWERS = {  # what the lazy grammar watches go by
    "prose": "The sea is calm today. Waves roll in slowly, and the gulls circle above the "
             "harbour while fishing boats return with their catch. " * 3,
    "code": 'def merge(a, b):\n    out = {**a}\n    for k, v in b.items():\n        out[k] = '
            '{"value": v, "seen": k in a}\n    return out\n\nprint(merge({"x": 1}, {"y": 2}))\n' * 2,
    "call": 'Let me check that. {"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "c"}}',
}
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}}, "required": ["name", "age"]}


def mask_costs(gen, make_mask, text: str, logits) -> list[float]:
    """Seconds of apply + advance per token of `text`, fed as the model's answer."""
    mask, costs = make_mask(), []
    for token in gen.tokenizer.encode(text, add_special_tokens=False).ids:
        t = time.perf_counter()
        mask.apply(logits)
        mask.advance(token)
        costs.append(time.perf_counter() - t)
    return costs


def decode_ms(gen, ids, mask=None) -> float:
    return 1000 / gen.generate(ids, SamplingConfig(), 96, mask=mask).decode_tok_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    gen = Generator.load(a.artifact, threads=a.threads)
    t0 = time.perf_counter()
    grammar = ToolCallGrammar.for_generator(gen)
    print(f"grammar tokenizer setup (once per server): {time.perf_counter() - t0:.2f} s")
    logits = gen.engine.forward([0], 0)
    prompt = gen.encode_chat([{"role": "user", "content": "Count from 1 to 100."}])
    step = statistics.median(decode_ms(gen, prompt) for _ in range(3))
    print(f"decode step: {step:.2f} ms (median of 3 runs of 96 tokens)")
    cases = [("forced call", lambda: grammar.mask_after(forced_prefix("required", TOOLS), TOOLS),
              CALL_REST),
             ("response_format", lambda: grammar.json_schema(PERSON), '{"name": "Ada", "age": 36}')]
    cases += [(f"auto, {k}", lambda: grammar.lazy_calls(TOOLS), v) for k, v in ANSWERS.items()]
    for label, make, text in cases:
        costs = [c for _ in range(3) for c in mask_costs(gen, make, text, logits)]
        mean = statistics.mean(costs) * 1000
        print(f"{label:18s} mask per token: mean {mean:.3f} ms, median "
              f"{statistics.median(costs) * 1000:.3f}, max {max(costs) * 1000:.2f} ms -> "
              f"{100 * mean / step:.1f}% of a step")
    code = gen.encode_chat([{"role": "user", "content": "Write a Python function that merges "
                                                        "two dicts, with a short example."}],
                           tools=TOOLS)
    ratios = []
    for _ in range(7):  # pairs, alternating, same greedy prompt: the host drifts between runs
        free = decode_ms(gen, code)
        ratios.append(decode_ms(gen, code, grammar.lazy_calls(TOOLS)) / free)
    ratios.sort()
    print(f"end to end, a code answer (96 tokens): under the lazy grammar each token takes "
          f"{100 * (statistics.median(ratios) - 1):+.1f}% (median of 7 pairs; pairs ranged "
          f"{100 * (ratios[0] - 1):+.1f}% to {100 * (ratios[-1] - 1):+.1f}%)")


if __name__ == "__main__":
    main()
