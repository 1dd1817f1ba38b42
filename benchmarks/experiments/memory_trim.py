"""Resident memory with and without handing the C heap's freed pages back to the system
(machine.give_back_freed_memory: glibc's malloc_trim after load and after each prompt), each
in a process of its own: after loading, and after a 900-token prompt and 64 tokens of answer
(docs/PERFORMANCE.md, "A lighter KV cache").

    python benchmarks/experiments/memory_trim.py ARTIFACT [--kernel matmulnbits|qgemm]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np


def _resident() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))


def measure(artifact: str, trim: bool, kernel: str) -> dict:
    import edgellm.machine as machine

    if not trim:
        machine._TRIM.append(None)  # as before: never called
    from edgellm.runtime.generator import Generator
    from edgellm.runtime.sampler import SamplingConfig

    gen = Generator.load(artifact, threads=2, kernel=kernel)
    loaded = _resident()
    ids = list(np.random.default_rng(0).integers(100, 20000, 900))
    gen.generate(ids, SamplingConfig(temperature=0), 64)
    return {"trim": trim, "loaded_mb": loaded, "after_mb": _resident()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--kernel", default="matmulnbits", choices=("matmulnbits", "qgemm"))
    p.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.artifact, a.one == "on", a.kernel)))
        return 0
    print(f"| {a.artifact} ({a.kernel}) | resident after load | after a 900-token request |")
    print("|---|---|---|")
    for one in ("off", "on"):
        done = subprocess.run([sys.executable, __file__, a.artifact, "--kernel", a.kernel,
                               "--one", one], capture_output=True, text=True, check=True)
        r = json.loads(done.stdout)
        print(f"| trim {one} | {r['loaded_mb']} MB | {r['after_mb']} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
