"""docs/QUALITY.md's "Tried and rejected" (the max|w| / 7 row): s4 with the old max|w| / 7 scale
and the current m / -8 (llama.cpp Q4_0's), and llama.cpp's own Q4_0 of the same GGUF, scored on
all of CPython's LICENSE.txt against the unquantized source (one reference, one run).

    python benchmarks/experiments/scale_rule.py          # ~45 min on the 2-core Xeon VM

The Q4_0 GGUF is the one benchmarks/compare_llamacpp.py --weight-type s4 makes (llama.cpp's
quantize of the Q4_K_M file; needs llama-cpp-python); it is built as fp32 weights and scored like
the others.
"""

import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from edgellm.compiler import BuildOptions, build
from edgellm.compiler.check import ReferenceModel
from edgellm.eval import evaluate
from edgellm.quant.schemes import GroupwiseIntScheme
from edgellm.runtime.generator import Generator

MODELS = Path.home() / ".cache/edgellm/models"
GGUF = MODELS / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
Q4_0 = MODELS / "qwen2.5-coder-0.5b-instruct-q4_k_m.Q4_0.gguf"
CURRENT = GroupwiseIntScheme._symmetric_scales


def before(self, blocks):  # the rule until 2026-11-26
    return np.abs(blocks).max(axis=-1) / self.qmax


S4_G32 = dict(weight_type="s4", group_size=32)
VARIANTS = [  # label, source, build options, symmetric scale rule
    ("s4 g32, m / -8", GGUF, S4_G32, CURRENT),
    ("s4 g32, max|w| / 7", GGUF, S4_G32, before),
    ("s4 g32 + s8 lm_head, m / -8", GGUF, dict(S4_G32, post_weight_type="s8"), CURRENT),
    ("s4 g32 + s8 lm_head, max|w| / 7", GGUF, dict(S4_G32, post_weight_type="s8"), before),
    ("llama.cpp Q4_0 as fp32", Q4_0, dict(weight_type="fp32", hidden_state_type="fp32"), CURRENT),
    ("s4 g128, m / -8", GGUF, dict(weight_type="s4"), CURRENT),
]


def main():
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    work = Path(tempfile.mkdtemp(prefix="edgellm-scale-rule-"))
    with ReferenceModel(GGUF, 512) as ref:
        for i, (label, source, opts, rule) in enumerate(VARIANTS):
            GroupwiseIntScheme._symmetric_scales = rule
            art = build(source, work / str(i), BuildOptions(kv_cache_len=512, **opts))
            gen = Generator.load(art, threads=2)
            ids = gen.tokenizer.encode(text, add_special_tokens=False).ids
            quality = evaluate(gen.engine, ids, 512, None, ref.engine)
            print(f"{label}: {quality.summary()}", flush=True)
            del gen
    GroupwiseIntScheme._symmetric_scales = CURRENT


if __name__ == "__main__":
    main()
