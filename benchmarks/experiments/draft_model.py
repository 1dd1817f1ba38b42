"""A draft model for the 1.5B (Qwen2.5-Coder-0.5B drafts k tokens greedily with its own KV
cache, the 1.5B verifies them in one forward), against prompt lookup and plain decode, per task
of benchmarks/speculative.py. Greedy only: a measurement of whether `--draft` would pay here,
not a feature.

    python benchmarks/experiments/draft_model.py --threads 2 [--k 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speculative import MAX_TOKENS, TASKS, TOOLS  # noqa: E402

from edgellm.demo import cached_artifact  # noqa: E402
from edgellm.runtime.generator import Generator  # noqa: E402
from edgellm.runtime.sampler import SamplingConfig  # noqa: E402


def draft_decode(target, draft, ids, max_new, k):
    """(tokens, seconds after the first token, target forwards)."""
    token = int(target.prefill(ids).argmax())
    draft.prefill(ids)
    t_first = time.perf_counter()
    out, pos, forwards, behind = [], len(ids), 0, []  # behind: tokens the draft has not seen
    eos = target.eos_ids
    while len(out) < max_new and token not in eos:
        out.append(token)
        feed, dpos, proposal = behind + [token], pos - len(behind), []
        for _ in range(min(k, max_new - len(out))):
            logits = draft.engine.forward(feed, dpos, all_logits=False)
            dpos += len(feed)
            feed = [int(logits.argmax())]
            proposal.append(feed[0])
        rows = target.engine.forward([token] + proposal, pos, all_logits=bool(proposal))
        rows = rows.reshape(len(proposal) + 1, -1)
        forwards += 1
        accepted = 0
        for i, d in enumerate(proposal):
            if int(rows[i].argmax()) != d or d in eos or len(out) >= max_new:
                break
            out.append(d)
            accepted += 1
        # the draft saw token and proposal[:-1]; the last accepted one may be new to it
        behind = proposal[accepted - 1:accepted] if accepted == len(proposal) and proposal else []
        pos += 1 + accepted
        token = int(rows[accepted].argmax())
    return out, time.perf_counter() - t_first, forwards


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--tokens", type=int, default=256)
    a = p.parse_args()
    target = Generator.load(cached_artifact("qwen2.5-coder-1.5b-instruct", "s8"),
                            threads=a.threads)
    draft = Generator.load(cached_artifact("qwen2.5-coder-0.5b-instruct", "s8"),
                           threads=a.threads)
    print(f"Qwen2.5-Coder-1.5B s8 target, 0.5B s8 draft (k={a.k}), {a.threads} threads, greedy")
    print("| task | tokens | plain tok/s | prompt lookup tok/s | draft model tok/s "
          "| draft tokens/forward | same as plain |")
    print("|---|---|---|---|---|---|---|")
    for task, messages in TASKS.items():
        tools = {"tools": TOOLS} if task.startswith("tool") else {}
        ids = target.encode_chat(messages, **tools)
        n = min(a.tokens, MAX_TOKENS.get(task, a.tokens))
        plain = target.generate(ids, SamplingConfig(), n)
        lookup = target.generate(ids, SamplingConfig(), n, speculate="lookup")
        out, secs, forwards = draft_decode(target, draft, ids, n, a.k)
        print(f"| {task} | {len(out)} | {plain.decode_tok_s:.1f} | {lookup.decode_tok_s:.1f} "
              f"| {(len(out) - 1) / secs:.1f} | {len(out) / max(forwards, 1):.2f} "
              f"| {'yes' if out == plain.token_ids else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
