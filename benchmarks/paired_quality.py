"""Compare built artifacts token by token on one text, against one reference pass.

    python benchmarks/paired_quality.py ART_A ART_B [ART_C ...] [--text FILE] [--context 512]

(ART@KERNEL: that artifact on one path of its integer weights, e.g. ART@qgemm: re-laid for ONNX
Runtime's integer GEMM, as the engine does on Arm cores without dotprod and where `--kernel auto`
times it faster, edgellm.onnx.qgemm; ART@matmulnbits: the graphs as built. ART alone: auto.)

For each artifact: perplexity vs the unquantized source (and the excess in mean negative
log-likelihood, with its standard error) and mean KL divergence, as `edgellm eval --reference`
prints them; then, against the first artifact, the mean per-token difference in
negative log-likelihood (the log of the perplexity ratio) and in KL, each with its standard error
over blocks of 64 consecutive tokens (neighbouring tokens' errors are correlated, so a per-token
standard error would be too small). A difference within about two standard errors is not one
the text can tell apart. Default text: CPython's LICENSE.txt, all of it; the reference is the
GGUF the artifacts were built from (--reference), built as fp32 and run by the numpy engine.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import numpy as np

from edgellm.compiler.check import ReferenceModel
from edgellm.eval import _windows, token_kl, token_nll, window_log_probs
from edgellm.runtime.generator import Generator

MODEL = Path.home() / ".cache/edgellm/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
BLOCK = 64


def per_token(engines, reference, ids: list[int], context: int):
    """Reference NLLs, and per engine (NLLs, KL divergences from the reference), per token; the
    reference runs once per window for all engines."""
    ref_nll, scores = [], [([], []) for _ in engines]
    for start, end, first in _windows(len(ids), context, context // 2):
        window = ids[start:end]
        targets = np.asarray(window[first + 1:])
        ref = window_log_probs(reference, window, first)
        ref_nll.extend(token_nll(ref, targets))
        for engine, (nll, kl) in zip(engines, scores):
            ours = window_log_probs(engine, window, first)
            nll.extend(token_nll(ours, targets))
            kl.extend(token_kl(ref, ours))
    return np.array(ref_nll), [(np.array(nll), np.array(kl)) for nll, kl in scores]


def block_mean_and_error(x: np.ndarray) -> tuple[float, float]:
    blocks = x[:len(x) // BLOCK * BLOCK].reshape(-1, BLOCK).mean(axis=1)
    return float(x.mean()), float(blocks.std(ddof=1) / np.sqrt(len(blocks)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--text", default=Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt")
    ap.add_argument("--reference", default=MODEL)
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()
    gens = [Generator.load(a.rsplit("@", 1)[0], kernel=a.rsplit("@", 1)[1]) if "@" in a
            else Generator.load(a) for a in args.artifacts]
    ids = gens[0].tokenizer.encode(Path(args.text).read_text("utf-8"),
                                   add_special_tokens=False).ids
    with ReferenceModel(args.reference, args.context) as ref:
        ref_nll, scores = per_token([g.engine for g in gens], ref.engine, ids, args.context)
    base_nll, base_kl = scores[0]
    print(f"{len(ids)} tokens, context {args.context}; reference perplexity "
          f"{np.exp(ref_nll.mean()):.4f}")
    for art, (nll, kl) in zip(args.artifacts, scores):
        d_nll, e_nll = block_mean_and_error(nll - base_nll)
        d_kl, e_kl = block_mean_and_error(kl - base_kl)
        excess, e_excess = block_mean_and_error(nll - ref_nll)
        print(f"{art}: perplexity {np.exp(nll.mean()):.4f} ({np.expm1(excess):+.2%}; "
              f"NLL over the source's {excess:+.4f} ± {e_excess:.4f}), mean KL {kl.mean():.4f}; "
              f"vs {args.artifacts[0]}: NLL {d_nll:+.4f} ± {e_nll:.4f}, KL {d_kl:+.4f} ± {e_kl:.4f}")


if __name__ == "__main__":
    main()
