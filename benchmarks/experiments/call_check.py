"""Can the model tell, asked outright, whether a function fits a request? If it could, a server
could ask it after each call under tool_choice auto and answer in words where it says no (BFCL's
irrelevance categories: a call where no tool fits). For BFCL cases (sampled as benchmarks/bfcl.py
samples them): the probability of "yes" against "no" at the first answer position of a question
about each offered function, for the functions that are the right call (BFCL's truth), the other
offered functions of a case that needs one, and every offered function of a case that needs
none. docs/AGENTS.md has the result (the 0.5B cannot tell; the 1.5B partly; nothing shipped).

    python benchmarks/experiments/call_check.py ART --per-category 8 --seed 1 [--style alone]

--style alone: a fresh conversation with the request and the function's name, parameters and
description; --style after: the request's own conversation (its tools in the system prompt, so
a server's prefix cache would hold all but the question) with the question as a user turn.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import numpy as np

from call_gate import IRRELEVANT, RELEVANT, bfcl  # this directory's: the same BFCL sample

from edgellm.runtime.generator import Generator
from edgellm.server import steps
from edgellm.server.schemas import ChatRequest


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--per-category", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--style", choices=("alone", "after"), default="alone")
    a = ap.parse_args()
    gen = Generator.load(a.artifact, threads=2, ctx_size=4096)
    tok = gen.tokenizer
    vocab = tok.get_vocab_size()
    tools_of, _ = bfcl._bfcl()

    def first_ids(words):
        return sorted({tok.encode(w, add_special_tokens=False).ids[0] for w in words})

    yes = first_ids(["yes", "Yes", " yes", " Yes", "YES"])
    no = first_ids(["no", "No", " no", " No", "NO"])

    def p_yes(entry, fn) -> float:
        if a.style == "alone":
            request = " ".join(m["content"] for m in entry["question"][0] if m["role"] == "user")
            params = ", ".join(fn.get("parameters", {}).get("properties", {}))
            text = (f"Request: {request}\n\nFunction: {fn['name']}({params}): "
                    f"{fn.get('description', '')}\n\nDoes calling this function do what the "
                    "request asks? Answer yes or no.")
            req = ChatRequest(model="m", messages=[{"role": "user", "content": text}])
        else:
            text = steps.CHECK_QUESTION.format(name=fn["name"])  # what serve asks
            req = ChatRequest(model="m", tools=tools_of(entry["function"]),
                              messages=entry["question"][0] + [{"role": "user", "content": text}])
        ids = steps.encode_chat(gen, req)[0]
        gen.cached_ids.clear()
        logits = np.asarray(gen.prefill(ids), dtype=np.float64).reshape(-1)[-vocab:]
        p = np.exp(logits - logits.max())
        return float(p[yes].sum() / (p[yes].sum() + p[no].sum()))

    seen = defaultdict(list)  # kind -> p(yes)
    for category in RELEVANT + IRRELEVANT:
        for entry, truth in bfcl.sample(category, a.per_category, a.seed):
            right = {next(iter(t)) for t in truth or []}
            for fn in entry["function"]:
                kind = ("no tool fits" if category in IRRELEVANT else
                        "right function" if fn["name"] in right else "another offered function")
                seen[kind].append(p_yes(entry, fn))
        print(f"{category} done", file=sys.stderr, flush=True)
    for kind, values in seen.items():
        print(f"{kind:26} {len(values):3} functions, p(yes) quartiles "
              + " ".join(f"{q:.2f}" for q in np.quantile(values, [0.25, 0.5, 0.75])))
    for threshold in (0.5, 0.6, 0.7, 0.75):
        print(f"below {threshold}: " + ", ".join(
            f"{kind} {sum(v < threshold for v in values)}/{len(values)}"
            for kind, values in seen.items()))


if __name__ == "__main__":
    main()
