"""One decode step of several artifacts, measured in turns in one process (for a noisy host).

    python benchmarks/decode_steps.py ART[@KERNEL] [ART[@KERNEL] ...] [--rows 1,2,4]
                                      [--prefill 24,128] [--turns 30] [--threads 2]

ART@KERNEL loads the artifact with `--kernel KERNEL` (matmulnbits, qgemm; auto without it), so
one artifact's paths can be compared in the same turns.

Each turn runs 10 decode steps (`decode_rows`: one token for each of `rows` slots, as
`serve --parallel` does; 1 row is plain decoding) and one prefill of each `--prefill` length of
every artifact in turn, so a slow minute of a shared host falls on all of them alike. Prints,
per artifact and measurement, the median and quartiles of its time over the turns, and each
artifact's median against the first's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def step_ms(engine, rows: int, steps: int = 10) -> float:
    """Mean ms of one decode step of `rows` slots over `steps` steps, after one to warm up."""
    engine.decode_rows(0, [100] * rows, [64] * rows)
    t = time.perf_counter()
    for step in range(steps):
        engine.decode_rows(0, [100] * rows, [65 + step] * rows)
    return (time.perf_counter() - t) / steps * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--rows", default="1,2,4")
    p.add_argument("--prefill", default="", help="prompt lengths to prefill too, e.g. 24,128")
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    from edgellm.runtime.generator import Generator

    rows = [int(r) for r in a.rows.split(",")]
    prefills = [int(n) for n in a.prefill.split(",") if n]
    engines = []
    for spec in a.artifacts:
        art, _, kernel = spec.partition("@")
        engines.append(Generator.load(art, threads=a.threads, slots=max(rows),
                                      kernel=kernel or "auto").engine)
        print(f"{spec}: {engines[-1].kernel.line()}", flush=True)
    kinds = [f"{n} rows, one step" for n in rows] + [f"prefill {n} tokens" for n in prefills]
    times = {(i, kind): [] for i in range(len(engines)) for kind in kinds}
    for _ in range(a.turns):
        for i, engine in enumerate(engines):
            for n in rows:
                times[i, f"{n} rows, one step"].append(step_ms(engine, n))
            for n in prefills:
                t = time.perf_counter()
                engine.forward([100 + k % 50 for k in range(n)], 0)
                times[i, f"prefill {n} tokens"].append((time.perf_counter() - t) * 1000)
    print("| artifact | measured | ms (median) | quartiles | vs first |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        first = np.median(times[0, kind])
        for i, art in enumerate(a.artifacts):
            t = times[i, kind]
            print(f"| {art} | {kind} | {np.median(t):.2f} | {np.percentile(t, 25):.2f}-"
                  f"{np.percentile(t, 75):.2f} | {np.median(t) / first:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
