"""docs/QUALITY.md's table: one model built with each weight type, scored on a fixed text.

    python benchmarks/quality_table.py ~/.cache/edgellm/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

Per variant: perplexity (sliding window), top-1 agreement and mean KL against the unquantized
source (fp32 weights, numpy reference engine), size of the weights on disk, decode and prefill
tok/s (`edgellm bench`: 128-token prompt, 64 generated, median of 3, 2 threads), every variant
in one sequential run. Text: CPython's LICENSE.txt, first --tokens tokens. The GPTQ rows are
built only with --gptq (or when named in --only).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
from pathlib import Path

from edgellm.bench import bench
from edgellm.compiler import BuildOptions, build
from edgellm.compiler.check import ReferenceModel
from edgellm.eval import evaluate
from edgellm.runtime.generator import Generator

S4 = dict(weight_type="s4", post_weight_type="s4", asymmetric=False)  # spelled out: s4 alone
# now means group 32, asymmetric, s8 lm_head (the "s4 default" row)
VARIANTS = [  # label, build options
    ("bf16", dict(weight_type="bf16")),
    ("s8 g128", dict(weight_type="s8")),
    ("s4 g128", dict(S4, group_size=128)),
    ("s4 g128, s8 lm_head", dict(S4, group_size=128, post_weight_type="s8")),
    ("s4 g32", dict(S4, group_size=32)),
    ("s4 g32 asymmetric", dict(S4, group_size=32, asymmetric=True)),
    ("s4 g32, s8 lm_head", dict(S4, group_size=32, post_weight_type="s8")),
    ("s4 default: g32 asymmetric, s8 lm_head", dict(weight_type="s4")),
    ("s4 g32 asymmetric, s8 lm_head, s8 layers 0,1,-1", dict(weight_type="s4", keep_s8="0,1,-1")),
    # GPTQ builds take ~12 minutes each here: not run unless named in --only
    ("s4 g32, GPTQ", dict(S4, group_size=32, quant_method="gptq")),
    ("s4 g32, GPTQ, s8 lm_head",
     dict(S4, group_size=32, post_weight_type="s8", quant_method="gptq")),
]
SLOW = {label for label, opts in VARIANTS if opts.get("quant_method") == "gptq"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", help="semicolon-separated variant labels")
    p.add_argument("--gptq", action="store_true", help="the GPTQ rows too (~12 minutes each)")
    a = p.parse_args()
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    work = Path(tempfile.mkdtemp(prefix="edgellm-quality-"))
    rows = []
    with ReferenceModel(a.source, a.context) as ref:
        for label, opts in VARIANTS:
            if (label not in a.only.split(";")) if a.only else (label in SLOW and not a.gptq):
                continue
            art = build(a.source, work / label.replace(" ", "_").replace(",", ""),
                        BuildOptions(kv_cache_len=a.context, **opts))
            gen = Generator.load(art, threads=a.threads)
            ids = gen.tokenizer.encode(text, add_special_tokens=False).ids[:a.tokens]
            q = evaluate(gen.engine, ids, a.context, None, ref.engine)
            size = sum(f.stat().st_size for f in art.glob("*.bin")
                       if not f.name.startswith("model.embed"))
            speed = bench(art, 128, 64, 3, threads=a.threads)
            rows.append((label, q, size, speed))
            print(f"{label}: {q.summary()}; {size / 1e6:.0f} MB; decode "
                  f"{speed['decode_tok_s']} tok/s, prefill {speed['prefill_tok_s']} tok/s "
                  f"({speed['engine']})", file=sys.stderr)
            del gen
    print(f"text: CPython LICENSE.txt, {rows[0][1].tokens} tokens scored, context "
          f"{rows[0][1].context}, stride {rows[0][1].stride}; unquantized reference perplexity "
          f"{rows[0][1].reference_perplexity:.4f}\n")
    print("| weights | perplexity | vs float | top-1 agreement | mean KL (nats) | "
          "layers + lm_head on disk | decode tok/s (engine) | prefill tok/s (128) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, q, size, speed in rows:
        change = (q.perplexity / q.reference_perplexity - 1) * 100
        print(f"| {label} | {q.perplexity:.4f} | {change:+.2f}% | {q.top1_agreement * 100:.2f}% | "
              f"{q.mean_kl:.4f} | {size / 1e6:.0f} MB | {speed['decode_tok_s']:.1f} "
              f"({speed['engine'].replace('Engine', '')}) | {speed['prefill_tok_s']:.0f} |")


if __name__ == "__main__":
    main()
