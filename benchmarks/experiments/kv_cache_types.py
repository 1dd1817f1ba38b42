"""ONNX Runtime's GroupQueryAttention alone with its KV cache in fp32, fp16, bf16, int8 (one
scale per tensor or per channel) and int4, at Qwen2.5-0.5B's attention shape (14 query heads over
2 KV heads of 64), the cache filled to a depth: one decode step, and one 128-row prompt chunk at
that depth (docs/PERFORMANCE.md, "A lighter KV cache"). The query stays fp32 (T); only the
cache's type (T_CACHE) changes. Scales are fixed constants: this times the kernels, not quality.

    python benchmarks/experiments/kv_cache_types.py [--depth 3000] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP, helper

H, KVH, D = 14, 2, 64
TYPES = [("fp32", TP.FLOAT, None, None), ("fp16", TP.FLOAT16, None, None),
         ("bf16", TP.BFLOAT16, None, None), ("int8, one scale", TP.INT8, "PER_TENSOR", 8),
         ("int8, per channel", TP.INT8, "PER_CHANNEL", 8),
         ("int4, per channel", TP.UINT8, "PER_CHANNEL", 4)]
NUMPY = {TP.FLOAT: np.float32, TP.FLOAT16: np.float16, TP.INT8: np.int8, TP.UINT8: np.uint8,
         TP.BFLOAT16: np.uint16}


def graph(cache_type, quant, bits, length: int) -> bytes:
    attrs = dict(num_heads=H, kv_num_heads=KVH, do_rotary=1, rotary_interleaved=0)
    inputs = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_seq_len", "cos", "sin"]
    angles = np.outer(np.arange(length), 1e6 ** -(np.arange(D // 2) / (D // 2)))
    inits = [helper.make_tensor("cos", TP.FLOAT, angles.shape, np.cos(angles).ravel()),
             helper.make_tensor("sin", TP.FLOAT, angles.shape, np.sin(angles).ravel())]
    if quant:
        attrs.update(k_quant_type=quant, v_quant_type=quant, kv_cache_bit_width=bits)
        inputs += ["", "", "", "k_scale", "v_scale"]  # position_ids, attention_bias, head_sink
        shape = [1] if quant == "PER_TENSOR" else [1, KVH, 1, D]
        inits += [helper.make_tensor(n, TP.FLOAT, shape, [s] * int(np.prod(shape)))
                  for n, s in (("k_scale", 0.05), ("v_scale", 0.02))]
    node = helper.make_node("GroupQueryAttention", inputs, ["attn", "present_key",
                                                             "present_value"],
                            domain="com.microsoft", **attrs)
    cache = ["b", KVH, length, D if bits != 4 else D // 2]
    value = helper.make_tensor_value_info
    g = helper.make_graph(
        [node], "attention",
        [value("qkv", TP.FLOAT, ["b", "n", (H + 2 * KVH) * D]),
         value("past_key", cache_type, cache), value("past_value", cache_type, cache),
         value("seqlens_k", TP.INT32, ["b"]), value("total_seq_len", TP.INT32, [])],
        [value("attn", TP.FLOAT, ["b", "n", H * D]), value("present_key", cache_type, cache),
         value("present_value", cache_type, cache)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid("com.microsoft", 1)]
                             ).SerializeToString()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    length = a.depth + 256
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {a.threads} threads, depth {a.depth}")
    print("| cache | bytes per position per layer | decode step | 128-row chunk |")
    print("|---|---|---|---|")
    for name, cache_type, quant, bits in TYPES:
        try:
            s = ort.InferenceSession(graph(cache_type, quant, bits, length), so,
                                     providers=["CPUExecutionProvider"])
        except Exception as e:  # not implemented on this CPU build
            print(f"| {name} | | not available: {str(e).splitlines()[0][:80]} | |")
            continue
        shape = (1, KVH, length, D if bits != 4 else D // 2)
        k, v = (ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, NUMPY[cache_type]))
                for _ in range(2))

        def run(n, pos):
            b = s.io_binding()
            b.bind_cpu_input("qkv", rng.standard_normal((1, n, (H + 2 * KVH) * D))
                             .astype(np.float32))
            b.bind_ortvalue_input("past_key", k)
            b.bind_ortvalue_input("past_value", v)
            b.bind_cpu_input("seqlens_k", np.array([pos + n - 1], np.int32))
            b.bind_cpu_input("total_seq_len", np.array(pos + n, np.int32))
            b.bind_output("attn")
            b.bind_ortvalue_output("present_key", k)
            b.bind_ortvalue_output("present_value", v)
            s.run_with_iobinding(b)

        for pos in range(0, a.depth, 500):
            run(min(500, a.depth - pos), pos)
        t = time.perf_counter()
        for _ in range(200):
            run(1, a.depth)
        decode = (time.perf_counter() - t) / 200
        t = time.perf_counter()
        for _ in range(5):
            run(128, a.depth - 128)
        chunk = (time.perf_counter() - t) / 5
        per_position = 2 * KVH * shape[3] * np.dtype(NUMPY[cache_type]).itemsize
        print(f"| {name} | {per_position} | {decode * 1e6:.0f} us | {chunk * 1e3:.1f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
