"""Perplexity of one artifact on the ORT engine and on the numpy reference engine, same text.

    python benchmarks/perplexity.py ~/.cache/edgellm/artifacts/qwen2.5-coder-0.5b-instruct-s8

Text: CPython's LICENSE.txt (present in every CPython install), first --tokens tokens, scored
with teacher forcing in chunks of the artifact's prefill length.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import numpy as np

from edgellm.runtime.generator import Generator


def license_text() -> str:
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not path.is_file():
        sys.exit(f"{path} not found")
    return path.read_text()


def perplexity(gen: Generator, ids: list[int]) -> float:
    engine, step = gen.engine, gen.engine.prefill_len
    nll = []
    for start in range(0, len(ids) - 1, step):
        chunk = ids[start:start + step]
        logits = engine.forward(chunk, start, all_logits=True).astype(np.float64)
        targets = ids[start + 1:start + 1 + len(chunk)]
        logits = logits[:len(targets)]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll.extend(logz - logits[np.arange(len(targets)), targets])
    return float(np.exp(np.mean(nll)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="numpy,ort", help="comma-separated (default: both)")
    a = p.parse_args()
    results = {}
    for engine in a.engines.split(","):
        gen = Generator.load(a.artifact, engine=engine, threads=a.threads)
        ids = gen.tokenizer.encode(license_text()).ids  # with BOS where the model adds one
        ids = ids[:min(a.tokens, gen.engine.kv_cache_len)]
        results[engine] = perplexity(gen, ids)
        print(f"{engine:6s} perplexity {results[engine]:.4f} over {len(ids)} tokens")
    if len(results) == 2:
        diff = results["ort"] / results["numpy"] - 1
        print(f"ort vs numpy reference: {diff * 100:+.2f}%")


if __name__ == "__main__":
    main()
