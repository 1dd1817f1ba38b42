"""KL against the source as a generation meets it: each window's first half prefilled as one
prompt (chunks: on `--kernel mixed` those run on the prompt path), its second half decoded one
token at a time (the decode path), each decoded token's next-token distribution against the
unquantized source's (fp32, numpy reference) on the same window. benchmarks/paired_quality.py
scores windows as prefills, so it cannot tell a mixed run's quality from its prompt path's.

    python benchmarks/experiments/decode_quality.py GGUF ART@KERNEL [ART@KERNEL ...]
                                                    [--windows 4] [--context 512]

(docs/PERFORMANCE.md, "Speed beside llama.cpp", the AVX2-only host.)
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import numpy as np

from edgellm.compiler.check import ReferenceModel
from edgellm.eval import _log_softmax, token_kl, token_nll
from edgellm.runtime.generator import Generator


def scores(gen, reference_logits, window: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(NLL, KL against the reference) of the decoded half's tokens."""
    half = len(window) // 2
    engine = gen.engine
    gen.cached_ids = []
    rows = [gen.prefill(window[:half], 0)]  # the prompt, in the artifact's chunks
    for pos in range(half, len(window) - 1):
        rows.append(engine.forward([window[pos]], pos))  # then one token at a time
    ours = _log_softmax(np.stack(rows))
    ref = _log_softmax(reference_logits[half - 1:len(window) - 1])
    targets = np.asarray(window[half:])
    return token_nll(ours, targets), token_kl(ref, ours)


def _decode_exact_prompts_fast(art: str) -> Generator:
    """ART on MatMulNBits for decode steps and QGEMM for prompt chunks (16 rows or more): what
    `--kernel mixed` runs where `auto` picks MatMulNBits (here it picks QGEMM for both)."""
    from edgellm.runtime import kernels, ort_engine

    choose = ort_engine._choose_kernel

    def forced(*args, **kwargs):
        return kernels.Choice("matmulnbits", "decode exact, prompts fast (experiment)",
                              weights=kernels.qgemm_weights(), prefill_path="qgemm",
                              prefill_rows=16)

    ort_engine._choose_kernel = forced
    try:
        return Generator.load(art)
    finally:
        ort_engine._choose_kernel = choose


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("artifacts", nargs="+", help="ART@KERNEL (matmulnbits, qgemm, mixed, auto; "
                    "split: decode on MatMulNBits, prompt chunks on QGEMM)")
    ap.add_argument("--text", default=Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    a = ap.parse_args()
    gens = [_decode_exact_prompts_fast(x.rsplit("@", 1)[0]) if x.endswith("@split") else
            Generator.load(x.rsplit("@", 1)[0], kernel=x.rsplit("@", 1)[1] if "@" in x else "auto")
            for x in a.artifacts]
    ids = gens[0].tokenizer.encode(Path(a.text).read_text("utf-8"), add_special_tokens=False).ids
    windows = [ids[i:i + a.context] for i in range(0, len(ids) - a.context + 1, a.context)]
    windows = windows[:a.windows]
    results = [([], []) for _ in gens]
    with ReferenceModel(a.source, a.context) as ref:
        for window in windows:
            logits = ref.engine.forward(window, 0, all_logits=True)
            for gen, (nll, kl) in zip(gens, results):
                n, k = scores(gen, logits, window)
                nll.extend(n)
                kl.extend(k)
    print(f"{len(windows)} windows of {a.context} tokens, the second half of each decoded")
    for name, gen, (nll, kl) in zip(a.artifacts, gens, results):
        print(f"{name} ({gen.engine.kernel.label()}): mean KL {np.mean(kl):.4f}, "
              f"NLL {np.mean(nll):.4f}, {len(kl)} tokens")


if __name__ == "__main__":
    main()
