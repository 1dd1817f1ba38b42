"""Build Qwen2.5-Coder-0.5B s4 g32 with GPTQ or AWQ and score it as docs/QUALITY.md does.

Needs edgellm at commit 9564bd0 with gptq-awq.patch applied (see README.md here):

    python run.py gptq --tokens 4096 --damp 0.01                    # +14.5%, KL 0.123
    python run.py gptq --tokens 32768 --damp 0.1 --pydoc-topics      # +8.8%, KL 0.085 (16 min)
    python run.py awq --tokens 4096                                  # +11.3%, KL 0.124
"""

import argparse
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import edgellm.build.builder as builder
import edgellm.quant.gptq as gptq
from edgellm.build.calibration import calibration_text
from edgellm.eval import evaluate_artifact

GGUF = Path.home() / ".cache/edgellm/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("method", choices=("gptq", "awq"))
p.add_argument("--tokens", type=int, default=4096)
p.add_argument("--damp", type=float, default=gptq.GPTQ_DAMP)
p.add_argument("--pydoc-topics", action="store_true",
               help="calibrate on the built-in text followed by CPython's pydoc_data topics")
a = p.parse_args()

calibration = None
if a.pydoc_topics:
    import pydoc_data.topics

    calibration = Path(tempfile.mkdtemp()) / "calibration.txt"
    calibration.write_text(calibration_text(None) + "\n\n".join(pydoc_data.topics.topics.values()))
builder.gptq_quantize = lambda w, gram, scheme: gptq.gptq_quantize(w, gram, scheme, damp=a.damp)
start = time.time()
out = builder.build(GGUF, Path(tempfile.mkdtemp()) / "s4", builder.BuildOptions(
    weight_type="s4", group_size=32, kv_cache_len=512, quant_method=a.method,
    calibration=str(calibration) if calibration else None, calibration_tokens=a.tokens))
built = time.time() - start
text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
quality = evaluate_artifact(out, text, reference_source=GGUF, max_tokens=1024)
print(f"{a.method} {a.tokens} tokens, damp {a.damp}: build {built:.0f} s; {quality.summary()}",
      file=sys.stderr)
