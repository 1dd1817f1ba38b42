"""The KV cache types side by side (`--cache-type`, runtime.kv_quant), each in a process of its
own: a `--depth`-token window of text the int8 scales never saw (python_docs.txt; they are
calibrated on mixed.txt) prefilled in chunks, timed, with every position's next-token
distribution kept; then decode at that depth (median of 32 steps) and the resident memory after.
The parent prints, against the fp32 cache: perplexity, mean KL of the next-token distributions,
top-1 agreement (docs/PERFORMANCE.md, "A lighter KV cache").

    python benchmarks/kv_cache.py ARTIFACT [--depth 2000] [--kernel auto] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEXT = Path(__file__).resolve().parents[1] / "edgellm" / "compiler" / "texts" / "python_docs.txt"


def _resident_mb() -> int:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmRSS"].split()[0]) // 1024


def measure(artifact: str, cache_type: str, depth: int, threads: int, kernel: str,
            out: str) -> dict:
    from edgellm.machine import give_back_freed_memory
    from edgellm.runtime.generator import Generator

    gen = Generator.load(artifact, threads=threads, kernel=kernel, cache_type=cache_type,
                         ctx_size=depth + 64)
    engine = gen.engine
    ids = gen.tokenizer.encode(TEXT.read_text()).ids[:depth]
    start = time.perf_counter()
    gen.prefill(ids)  # as a prompt is: the last position's logits only
    prefill = time.perf_counter() - start
    steps = []
    for i in range(32):
        start = time.perf_counter()
        engine.forward([ids[i]], len(ids) + i)
        steps.append(time.perf_counter() - start)
    give_back_freed_memory()
    resident = _resident_mb()
    logp = []  # then again, every position's distribution (untimed)
    for s in range(0, len(ids), engine.prefill_len):
        x = engine.forward(ids[s:s + engine.prefill_len], s, all_logits=True).astype(np.float64)
        x -= x.max(-1, keepdims=True)
        logp.append((x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32))
    np.save(out, np.concatenate(logp))
    return {"cache_type": cache_type, "kernel": engine.kernel.path,
            "kv_mb": engine.kv_bytes() / 2**20, "tokens": len(ids),
            "prefill_tok_s": len(ids) / prefill, "decode_tok_s": 1 / float(np.median(steps)),
            "resident_mb": resident}


def measure_llama_cpp(gguf: str, ids: list[int], cache_type: str, threads: int,
                      out: str) -> dict:
    """llama.cpp on the source GGUF over the same token ids: its f16 cache or its q8_0 one
    (`-ctk q8_0 -ctv q8_0`, which needs flash attention; both runs use it)."""
    import llama_cpp

    kinds = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
    llm = llama_cpp.Llama(gguf, n_ctx=len(ids) + 64, n_batch=128, n_threads=threads,
                          logits_all=True, flash_attn=True, type_k=kinds[cache_type],
                          type_v=kinds[cache_type], verbose=False)
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    x = np.array(llm.scores[:len(ids)], np.float64)
    x -= x.max(-1, keepdims=True)
    np.save(out, (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32))
    return {"cache_type": f"llama.cpp {cache_type}", "kernel": Path(gguf).name, "kv_mb": 0,
            "tokens": len(ids), "prefill_tok_s": len(ids) / prefill, "decode_tok_s": 0,
            "resident_mb": _resident_mb()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--depth", type=int, default=2000)
    p.add_argument("--types", default="fp32,int8")
    p.add_argument("--kernel", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-cpp", metavar="GGUF",
                   help="also llama.cpp (llama-cpp-python) on this GGUF, its f16 and q8_0 caches "
                        "over the same token ids, the KL of q8_0 against its own f16")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # a child: TYPE OUT.npy
    a = p.parse_args()
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(Path(a.artifact) / "tokenizer.json")).encode(
        TEXT.read_text()).ids[:a.depth]
    if a.one:
        r = measure_llama_cpp(a.llama_cpp, ids, a.one[0], a.threads, a.one[1]) if a.llama_cpp \
            else measure(a.artifact, a.one[0], a.depth, a.threads, a.kernel, a.one[1])
        print(json.dumps(r))
        return 0
    groups = [[(kv, []) for kv in a.types.split(",")]]
    if a.llama_cpp:
        groups.append([(kv, ["--llama-cpp", a.llama_cpp]) for kv in ("f16", "q8_0")])
    target = np.array(ids[1:])
    for group in groups:
        rows, logp = [], {}
        with tempfile.TemporaryDirectory() as tmp:
            for kv, extra in group:
                out = str(Path(tmp) / f"{kv}.npy")
                done = subprocess.run([sys.executable, __file__, a.artifact, "--one", kv, out,
                                       "--depth", str(a.depth), "--threads", str(a.threads),
                                       "--kernel", a.kernel, *extra],
                                      capture_output=True, text=True)
                if done.returncode:
                    print(f"{kv}: failed: {done.stderr.strip().splitlines()[-1:]}",
                          file=sys.stderr)
                    return 1
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                logp[rows[-1]["cache_type"]] = np.load(out)[:len(target)].astype(np.float64)
        _table(a, ids, rows, logp, target)
    return 0


def _table(a, ids, rows, logp, target) -> None:
    base = logp[rows[0]["cache_type"]]
    print(f"{Path(a.artifact).name}, {a.threads} threads, {rows[0]['kernel']}, a "
          f"{len(ids)}-token window of {TEXT.name} (int8 scales from mixed.txt); KL and top-1 "
          f"against the first row")
    print("| KV cache | its size | perplexity | KL | top-1 the same | prefill of the "
          "window | decode at that depth | resident after |")
    print("|---|---|---|---|---|---|---|---|")
    nll0 = -base[np.arange(len(target)), target].mean()
    for r in rows:
        lp = logp[r["cache_type"]]
        nll = -lp[np.arange(len(target)), target].mean()
        kl = float((np.exp(base) * (base - lp)).sum(-1).mean())
        top1 = float((base.argmax(-1) == lp.argmax(-1)).mean())
        print(f"| {r['cache_type']} | {r['kv_mb']:.0f} MB | {np.exp(nll):.4f} "
              f"({100 * (np.exp(nll - nll0) - 1):+.3f}%) | {kl:.4f} | {100 * top1:.1f}% | "
              f"{r['prefill_tok_s']:.1f} tok/s | {r['decode_tok_s']:.1f} tok/s | "
              f"{r['resident_mb']} MB |")


if __name__ == "__main__":
    sys.exit(main())
