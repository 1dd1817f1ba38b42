"""The whole model with its KV cache in fp32 (as shipped), fp16 or int8 (one scale per channel,
calibrated on another text), through ONNX Runtime's GroupQueryAttention (its T_CACHE): for each,
in a process of its own, the perplexity of a `--depth`-token window of text (one prefill of it,
timed), then decode speed at that depth and resident memory (docs/PERFORMANCE.md, "A lighter KV
cache"). The layer graphs are changed here, at load; the runtime itself holds fp32.

    python benchmarks/experiments/kv_cache_engine.py ARTIFACT [--depth 3000] [--types fp32,fp16,int8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TEXT = Path(__file__).resolve().parents[2] / "edgellm" / "compiler" / "texts" / "python_docs.txt"
ONNX = {"fp16": 10, "int8": 3}  # TensorProto.FLOAT16, INT8
NUMPY = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}


def _resident() -> tuple[int, int]:
    """(now, peak) resident MB of this process."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return tuple(int(status[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM"))


def _engine(art, kv: str, context: int, threads: int, scales=None):
    """An OrtEngine whose layer graphs hold the cache as `kv` (scales: per layer (k, v) for
    int8, [1, kv_heads, 1, head_dim] each)."""
    from onnx import TensorProto, helper

    import edgellm.onnx.graphs as graphs
    from edgellm.runtime.ort_engine import OrtEngine

    plain = graphs.with_context

    def with_context(model, cfg, layer, ctx):
        plain(model, cfg, layer, ctx)
        if kv == "fp32":
            return
        for v in [*model.graph.input, *model.graph.output]:
            if v.name in graphs.CACHE_IO:
                v.type.tensor_type.elem_type = ONNX[kv]
        if kv == "int8":
            node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
            node.input.extend(["", "", "", "k_scale", "v_scale"])
            node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                                   helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                                   helper.make_attribute("kv_cache_bit_width", 8)])
            model.graph.initializer.extend(
                helper.make_tensor(name, TensorProto.FLOAT, s.shape, s.ravel())
                for name, s in zip(("k_scale", "v_scale"), scales[layer]))

    graphs.with_context = with_context  # every layer is changed (a context not the artifact's)
    try:
        engine = OrtEngine(art, threads=threads, kernel="matmulnbits", context=context)
    finally:
        graphs.with_context = plain
    engine.k_np, engine.v_np = (np.zeros(engine.k_np.shape, NUMPY[kv]) for _ in range(2))
    return engine


def _nll(engine, ids: list[int]) -> np.ndarray:
    """Negative log-likelihood of each next token, the window fed in 128-token chunks."""
    out = []
    for s in range(0, len(ids) - 1, 128):
        chunk = ids[s:min(s + 128, len(ids) - 1)]
        logits = engine.forward(chunk, s, all_logits=True).astype(np.float64)
        top = logits.max(1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
        out.append(lse - logits[np.arange(len(chunk)), ids[s + 1:s + 1 + len(chunk)]])
    return np.concatenate(out)


def _calibrate(art, ids: list[int], context: int, threads: int) -> list:
    """Per layer, (k, v) scales: each channel's largest magnitude over a window of another
    text / 127; a rotary pair's two channels share the larger (rotation mixes them)."""
    engine = _engine(art, "fp32", context, threads)
    _nll(engine, ids)
    cfg, n = art.config, len(ids)
    scales = []
    for layer in range(cfg.num_layers):
        k = np.abs(engine.k_np[layer, 0, :, :n]).max(1)  # [kv_heads, head_dim]
        half = (cfg.rotary_dim or cfg.head_dim) // 2
        pair = np.maximum(k[:, :half], k[:, half:2 * half])
        k[:, :half], k[:, half:2 * half] = pair, pair
        v = np.abs(engine.v_np[layer, 0, :, :n]).max(1)
        shape = (1, cfg.num_kv_heads, 1, cfg.head_dim)
        scales.append(tuple((np.maximum(x, 1e-6) / 127).reshape(shape).astype(np.float32)
                            for x in (k, v)))
    return scales


def measure(artifact: str, kv: str, depth: int, threads: int) -> dict:
    from tokenizers import Tokenizer

    from edgellm.artifact.reader import load_artifact
    from edgellm.machine import give_back_freed_memory

    art = load_artifact(artifact)
    ids = Tokenizer.from_file(str(art.path / "tokenizer.json")).encode(TEXT.read_text()).ids
    calibration, window = ids[:depth], ids[depth:2 * depth]
    context = depth + 64 + (depth + 64 == art.manifest.kv_cache_len)  # not the artifact's
    scales = _calibrate(art, calibration, context, threads) if kv == "int8" else None
    engine = _engine(art, kv, context, threads, scales)
    loaded = _resident()
    start = time.perf_counter()
    nll = _nll(engine, window)
    prefill = time.perf_counter() - start
    steps = []
    for i in range(32):
        start = time.perf_counter()
        engine.forward([window[i]], depth - 1 + i)
        steps.append(time.perf_counter() - start)
    give_back_freed_memory()  # as the runtime does after each prompt
    now, peak = _resident()
    return {"kv": kv, "kv_mb": (engine.k_np.nbytes + engine.v_np.nbytes) / 2**20,
            "perplexity": float(np.exp(nll.mean())), "prefill_s": prefill,
            "decode_tok_s": 1 / float(np.median(steps)), "loaded_mb": loaded[0],
            "resident_mb": now, "peak_mb": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--depth", type=int, default=3000)
    p.add_argument("--types", default="fp32,fp16,int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child: measure this type, print JSON
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.artifact, a.one, a.depth, a.threads)))
        return 0
    rows = []
    for kv in a.types.split(","):
        done = subprocess.run([sys.executable, __file__, a.artifact, "--one", kv, "--depth",
                               str(a.depth), "--threads", str(a.threads)],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"{kv}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout))
    base = rows[0]
    print(f"{Path(a.artifact).name}, {a.threads} threads, a {a.depth}-token window of "
          f"{TEXT.name} (int8 scales from the {a.depth} tokens before it)")
    print("| KV cache | its size | perplexity | prefill of the window | decode at that depth "
          "| resident after load | after (trimmed) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv']} | {r['kv_mb']:.0f} MB | {r['perplexity']:.4f} "
              f"({100 * (r['perplexity'] / base['perplexity'] - 1):+.3f}%) | "
              f"{r['prefill_s']:.1f} s | {r['decode_tok_s']:.1f} tok/s | {r['loaded_mb']} MB | "
              f"{r['resident_mb']} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
