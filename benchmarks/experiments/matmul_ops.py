"""ONNX Runtime's 8-bit MatMulNBits alone, on random weights of Qwen2-0.5B's shapes: what one
op costs for 1..M rows, and what one op over q/k/v (or gate/up) costs against separate ones.
The figures in docs/PERFORMANCE.md ("Where a decode step goes", "Several clients at once").

    python benchmarks/experiments/matmul_ops.py [--threads 2] [--copies 24] [--groups]

--groups: instead, one gate projection (896 -> 4864) in 4 and 8 bits, groups of 32, 64 and 128,
with and without a zero point per group: one row (GB/s of its weight bytes) and 128 rows
(GOP/s); docs/PERFORMANCE.md, "The s4 layout's speed".

Each configuration is built `copies` times (distinct weights, so that most of them are not in
cache: as in a decode step, which reads every layer's weights once) and each session run once a
round; printed: microseconds per op, median over rounds. `--copies 1` keeps the weights in cache.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

K, BLOCK = 896, 128


def session(ns: list[int], fused: bool, bits: int = 8, block: int = BLOCK,
            zero_points: bool = False, seed: int = 0):
    """One graph: x [M, K] -> one MatMulNBits per output size in ns, or one over all of them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    groups = [[sum(ns)]] if fused else [[n] for n in ns]
    nodes, inits, outs = [], [], []
    blocks = K // block
    for i, (n,) in enumerate(groups):
        inits += [numpy_helper.from_array(rng.integers(0, 255, (n, blocks, block * bits // 8),
                                                       np.uint8), f"q{i}"),
                  numpy_helper.from_array((rng.random(n * blocks) * 0.01).astype(np.float32),
                                          f"s{i}")]
        inputs = ["x", f"q{i}", f"s{i}"]
        if zero_points:
            inits.append(numpy_helper.from_array(
                rng.integers(0, 255, n * -(-blocks * bits // 8), np.uint8), f"z{i}"))
            inputs.append(f"z{i}")
        nodes.append(helper.make_node("MatMulNBits", inputs, [f"y{i}"],
                                      domain="com.microsoft", K=K, N=n, bits=bits,
                                      block_size=block, accuracy_level=4))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None, n]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [None, K])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.use_per_session_threads = False
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def per_op_us(sessions, rows: int, rounds: int = 10) -> float:
    x = np.random.default_rng(1).random((rows, K), np.float32)
    times = []
    for _ in range(rounds + 1):
        t = time.perf_counter()
        for s in sessions:
            s.run(None, {"x": x})
        times.append((time.perf_counter() - t) / len(sessions) * 1e6)
    return float(np.median(times[1:]))


def groups_table(copies: int):
    n = 4864
    print("| bits | group | zero points | 1 row | weights read | 128 rows | int8 work |")
    print("|---|---|---|---|---|---|---|")
    for bits in (4, 8):
        for block in (32, 64, 128):
            for zero_points in (True, False):
                sessions = [session([n], False, bits, block, zero_points, seed)
                            for seed in range(copies)]
                size = n * K * bits / 8 + n * K / block * (4 + (bits / 8 if zero_points else 0))
                one, full = per_op_us(sessions, 1), per_op_us(sessions, 128, rounds=4)
                print(f"| {bits} | {block} | {'yes' if zero_points else 'no'} | {one:.0f} µs "
                      f"| {size / one / 1e3:.1f} GB/s | {full / 1e3:.2f} ms "
                      f"| {2 * n * K * 128 / full / 1e3:.0f} GOP/s |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--copies", type=int, default=24)
    p.add_argument("--groups", action="store_true",
                   help="4- and 8-bit weights in groups of 32, 64, 128 (see above)")
    a = p.parse_args()
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(a.threads, 1)  # as the engine does
    if a.groups:
        groups_table(a.copies)
        return 0
    print("| op | " + " | ".join(f"{m} rows" for m in (1, 2, 4, 8)) + " |")
    print("|---|" + "---|" * 4)
    cases = [("gate 896→4864", [4864], False),
             ("q, k, v apart (896→896, 128, 128)", [896, 128, 128], False),
             ("q/k/v as one (896→1152)", [896, 128, 128], True),
             ("gate, up apart (896→4864 twice)", [4864, 4864], False),
             ("gate/up as one (896→9728)", [4864, 4864], True)]
    for label, ns, fused in cases:
        sessions = [session(ns, fused) for _ in range(a.copies)]
        print(f"| {label} | " + " | ".join(f"{per_op_us(sessions, m):.0f} µs"
                                           for m in (1, 2, 4, 8)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
