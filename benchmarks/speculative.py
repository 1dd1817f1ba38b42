"""Prompt-lookup speculative decoding, per task class: edgellm plain vs `--speculate lookup` /
`auto`, and llama.cpp plain vs its own prompt lookup (llama-cpp-python's
LlamaPromptLookupDecoding), same model, same prompts, same threads, in one run. Greedy.

    pip install llama-cpp-python==0.3.36   # optional (see docs/PERFORMANCE.md for CMAKE_ARGS)
    python benchmarks/speculative.py --model qwen2.5-coder-0.5b-instruct --threads 2

edgellm runs the s8 artifact (`edgellm build --weight-type s8`), llama.cpp the Q8_0 it makes
from the same Q4_K_M GGUF. Decode tok/s counts the tokens after the first over the time after
the first (TTFT apart); "tokens/forward" is answer tokens per target forward. "4-token kernel
flips": positions of the plain answer where a 4-token forward's argmax differs from the one-token
forward's (a near tie rounded differently by the two kernels; where there is one, speculative
and plain answers part there); a task marked "(a near tie)" got a different answer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from edgellm.demo import cached_artifact
from edgellm.hub.pull import pull
from edgellm.runtime.generator import Generator
from edgellm.runtime.sampler import SamplingConfig

CODE = '''def load_settings(path):
    settings = {}
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def merge_settings(defaults, overrides):
    merged = dict(defaults)
    for key, value in overrides.items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def save_settings(path, settings):
    with open(path, "w") as handle:
        for key in sorted(settings):
            handle.write(f"{key} = {settings[key]}\\n")
'''

ARTICLE = (
    "The town council met on Tuesday to discuss the new bus routes. The transport officer said "
    "that \"the number 12 bus will run every ten minutes from March, and the night service will "
    "continue until two in the morning\". Several residents complained that the old stop on "
    "Mill Street would close. The council leader answered that \"no stop will close before a "
    "public consultation has taken place\". The budget for the changes is 1.2 million pounds, "
    "paid by the regional transport fund. A final decision is expected in February.")

TOOLS = [{"type": "function", "function": {
    "name": "send_email", "description": "Send an email",
    "parameters": {"type": "object", "properties": {
        "to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}},
        "required": ["to", "subject", "body"]}}}]

TASKS = {
    "code edit": [{"role": "user", "content": "Rename `settings` to `config` everywhere in this "
                   "code and return the whole file, nothing else:\n```python\n" + CODE + "```"}],
    "refactor": [{"role": "user", "content": "Add type hints to every function in this code and "
                  "return the complete code:\n```python\n" + CODE + "```"}],
    "summarise with quotes": [{"role": "user", "content": "Summarise this article in three "
                               "sentences, quoting what the officials said word for word:\n\n"
                               + ARTICLE}],
    "tool call quoting the request": [{"role": "user", "content": "Email anna@example.com with "
                                       "the subject \"Bus routes\" and this text as the body: "
                                       + ARTICLE}],
    "free story": [{"role": "user", "content": "Write a short story about a lighthouse keeper "
                    "who finds a mysterious map."}],
}
# greedy decoding of a small model's story falls into a loop after about 120 tokens (a loop is
# easy to draft): the story is cut before it, to measure text that copies nothing
MAX_TOKENS = {"free story": 100}


def edgellm_runs(gen, ids, tokens, repeats, mode):
    runs = [gen.generate(ids, SamplingConfig(), tokens, speculate=mode) for _ in range(repeats)]
    r = runs[0]
    forwards = r.speculation.forwards if r.speculation else max(len(r.token_ids) - 1, 1)
    return {"tok_s": statistics.median(x.decode_tok_s for x in runs),
            "tokens": len(r.token_ids), "per_forward": len(r.token_ids) / max(forwards, 1),
            "ids": r.token_ids}


def kernel_flips(gen, ids, answer, k=4) -> int:
    """Positions of the plain answer where the multi-token forward (k tokens at once, as when
    verifying drafts) picks another argmax than the one-token forward did: near ties that the
    two ONNX Runtime kernels round differently (the numpy engine has none)."""
    logits, flips = gen.prefill(ids), 0
    seq = [int(logits.argmax())] + answer[1:]
    assert seq[0] == answer[0]
    pos = len(ids)
    for start in range(0, len(answer) - 1, k):
        chunk = answer[start:start + k]
        rows = gen.engine.forward(chunk, pos + start, all_logits=True).reshape(len(chunk), -1)
        nxt = answer[start + 1:start + 1 + len(chunk)]
        flips += sum(int(r.argmax()) != t for r, t in zip(rows, nxt))
    return flips


def llama_runs(llm, text, tokens, repeats):
    speeds, out = [], []
    for _ in range(repeats):
        llm.reset()
        t_first, n, pieces = None, 0, []
        for chunk in llm.create_completion(text, max_tokens=tokens, temperature=0.0,
                                           stream=True):
            t_first = t_first or time.perf_counter()
            n += 1
            pieces.append(chunk["choices"][0]["text"])
        speeds.append((n - 1) / max(time.perf_counter() - t_first, 1e-9))
        out = pieces
    return {"tok_s": statistics.median(speeds), "tokens": n, "text": "".join(out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256, help="max answer tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    gen = Generator.load(cached_artifact(a.model, "s8"), threads=a.threads)
    llm = None
    if not a.no_llama_cpp:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        from compare_llamacpp import llama_cpp_quantized

        q8 = str(llama_cpp_quantized(pull(a.model), "Q8_0"))
        kw = dict(n_ctx=2048, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
        llm = Llama(q8, **kw)
        llm_lookup = Llama(q8, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10), **kw)

    gen.generate(gen.encode_chat(TASKS["free story"])[:16], SamplingConfig(), 4)  # warm-up
    rows = []
    for task, messages in TASKS.items():
        tools = TOOLS if task.startswith("tool") else None
        ids = gen.encode_chat(messages, **({"tools": tools} if tools else {}))
        row = {"task": task, "prompt_tokens": len(ids)}
        tokens = min(a.tokens, MAX_TOKENS.get(task, a.tokens))
        plain = edgellm_runs(gen, ids, tokens, a.repeats, "off")
        for mode in ("lookup", "auto"):
            spec = edgellm_runs(gen, ids, tokens, a.repeats, mode)
            row[mode] = {k: v for k, v in spec.items() if k != "ids"}
            row[mode]["same_as_plain"] = spec["ids"] == plain["ids"]
        row["plain"] = {k: v for k, v in plain.items() if k != "ids"}
        row["kernel_flips"] = kernel_flips(gen, ids, plain["ids"])
        if llm is not None:
            text = gen.tokenizer.decode(ids, skip_special_tokens=False)
            row["llama.cpp"] = llama_runs(llm, text, tokens, a.repeats)
            row["llama.cpp lookup"] = llama_runs(llm_lookup, text, tokens, a.repeats)
            for k in ("llama.cpp", "llama.cpp lookup"):
                row[k].pop("text")
        rows.append(row)
        print(json.dumps(row), flush=True) if a.json else None

    print(f"\nmodel {a.model} s8 (edgellm) / Q8_0 (llama.cpp), {a.threads} threads, greedy, "
          f"up to {a.tokens} tokens, median of {a.repeats}")
    head = ("| task | answer tokens | 4-token kernel flips | edgellm plain | lookup | tokens/forward "
            "| speedup | auto |")
    sep = "|---|---|---|---|---|---|---|---|"
    if llm is not None:
        head += " llama.cpp plain | llama.cpp lookup | edgellm lookup / llama.cpp lookup |"
        sep += "---|---|---|"
    print(head)
    print(sep)
    for r in rows:
        pl, lk, au = r["plain"], r["lookup"], r["auto"]
        line = (f"| {r['task']} | {pl['tokens']} | {r['kernel_flips']} | {pl['tok_s']:.1f} "
                f"| {lk['tok_s']:.1f} "
                f"| {lk['per_forward']:.2f} | {lk['tok_s'] / pl['tok_s']:.2f}x "
                f"| {au['tok_s']:.1f} ({au['tok_s'] / pl['tok_s']:.2f}x) |")
        if "same_as_plain" in lk and not (lk["same_as_plain"] and au["same_as_plain"]):
            line = line.replace(f"| {r['task']} |", f"| {r['task']} (a near tie) |")
        if llm is not None:
            lc, ll = r["llama.cpp"], r["llama.cpp lookup"]
            line += (f" {lc['tok_s']:.1f} | {ll['tok_s']:.1f} ({ll['tok_s'] / lc['tok_s']:.2f}x) "
                     f"| {lk['tok_s'] / ll['tok_s']:.2f}x |")
        print(line)


if __name__ == "__main__":
    main()
