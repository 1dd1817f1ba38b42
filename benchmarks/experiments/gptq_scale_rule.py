"""GPTQ s4 g32 under the old max|w| / 7 scale rule instead of the current m / -8, scored like
docs/QUALITY.md's whole-text figures (all of CPython's LICENSE.txt, context 512, stride 256).

    python benchmarks/experiments/gptq_scale_rule.py     # ~20 min on the 2-core Xeon VM

`--quant-method gptq` picks each group's scale from the columns GPTQ has updated so far; with
m / -8 a weight of the other sign beyond 7/8 of |m| clips, and GPTQ moves weights around.
"""

import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from edgellm.compiler import BuildOptions, build
from edgellm.compiler.check import ReferenceModel
from edgellm.eval import evaluate
from edgellm.quant.schemes import GroupwiseIntScheme
from edgellm.runtime.generator import Generator

sys.path.insert(0, str(Path(__file__).parent))
from scale_rule import GGUF, before  # noqa: E402

text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
work = Path(tempfile.mkdtemp(prefix="edgellm-gptq-rule-"))
GroupwiseIntScheme._symmetric_scales = before
start = time.time()
art = build(GGUF, work / "gptq-old-rule", BuildOptions(
    kv_cache_len=512, weight_type="s4", group_size=32, quant_method="gptq"))
print(f"build {time.time() - start:.0f} s", flush=True)
with ReferenceModel(GGUF, 512) as ref:
    gen = Generator.load(art, threads=2)
    ids = gen.tokenizer.encode(text, add_special_tokens=False).ids
    for label, n in (("first 1024 tokens", 1024), ("whole text", len(ids))):
        quality = evaluate(gen.engine, ids[:n], 512, None, ref.engine)
        print(f"GPTQ s4 g32, max|w| / 7, {label}: {quality.summary()}", flush=True)
