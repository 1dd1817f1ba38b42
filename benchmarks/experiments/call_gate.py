"""Does the model know, at its first answer token, whether a tool fits? For BFCL cases (sampled as
benchmarks/bfcl.py samples them), the probability the model gives the tokens that can open a call
(the template's <tool_call>, a code fence, an object) at the first position of the answer, per
category: if the cases where no tool fits had a lower figure than those where one does, a server
could hold the answer to words below a threshold. docs/AGENTS.md has the result (it did not
separate them; nothing shipped).

    python benchmarks/experiments/call_gate.py ART --per-category 30 --seed 1 [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bfcl  # noqa: E402

from edgellm.runtime.generator import Generator  # noqa: E402
from edgellm.server import steps  # noqa: E402
from edgellm.server.schemas import ChatRequest  # noqa: E402

RELEVANT = ["simple_python", "multiple", "live_simple", "live_multiple"]
IRRELEVANT = ["irrelevance", "live_irrelevance"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--per-category", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ctx-size", type=int, default=4096)
    ap.add_argument("--out", help="one JSON line per case")
    a = ap.parse_args()
    gen = Generator.load(a.artifact, threads=2, ctx_size=a.ctx_size)
    tools_of, _ = bfcl._bfcl()
    vocab = gen.tokenizer.get_vocab_size()
    pieces = [gen.tokenizer.decode([i]) for i in range(vocab)]
    tag = gen.tokenizer.token_to_id("<tool_call>")
    opens = np.array([i == tag or p.lstrip().startswith(("```", "{"))
                      for i, p in enumerate(pieces)])
    out = open(a.out, "w") if a.out else None
    seen = defaultdict(list)
    for category in IRRELEVANT + RELEVANT:
        for entry, _truth in bfcl.sample(category, a.per_category, a.seed):
            req = ChatRequest(model="m", messages=entry["question"][0],
                              tools=tools_of(entry["function"]), tool_choice="auto")
            ids = steps.encode_chat(gen, req)[0]
            if len(ids) >= a.ctx_size - 1:
                continue
            gen.cached_ids.clear()
            logits = np.asarray(gen.prefill(ids), dtype=np.float64).reshape(-1)[-vocab:]
            p = np.exp(logits - logits.max())
            p /= p.sum()
            p_open = float(p[opens].sum())
            seen[category].append(p_open)
            if out:
                out.write(json.dumps({"category": category, "id": entry["id"], "tokens": len(ids),
                                      "p_open": p_open, "top": pieces[int(p.argmax())]}) + "\n")
        print(f"{category:18} {len(seen[category]):3} cases, p(open a call) quartiles "
              + " ".join(f"{q:.2f}" for q in np.quantile(seen[category], [0.25, 0.5, 0.75])),
              flush=True)
    for threshold in (0.3, 0.5, 0.7, 0.8):
        cut = {c: sum(x < threshold for x in v) / len(v) for c, v in seen.items()}
        print(f"below {threshold}: " + ", ".join(f"{c} {f:.0%}" for c, f in cut.items()))


if __name__ == "__main__":
    main()
