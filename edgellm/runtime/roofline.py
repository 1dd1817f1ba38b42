"""The physical limits a speed figure stands beside (issue 42): what one decoded token reads, how
fast this machine reads memory with the same threads, and how fast its integer GEMM multiplies.

Decoding one token reads every layer and lm_head weight once (and the KV cache up to the
position), so it cannot run faster than read bandwidth / bytes per token: the roofline. The
bandwidth is measured here, not looked up: numpy's max-reduction over a buffer as large as the
weights one token reads (released GIL, one slice per thread), the best of a few passes. A host
whose cache holds the model (the Xeon VM's 480 MiB L3 holds a 0.5B s4 model) reads from cache,
and so does the probe: the roofline is then the cache's, as it is for the engine. Prompt chunks
are matrix products: their speed stands beside ONNX Runtime's own integer GEMM on one of the
model's matrices (MatMulInteger, as the QGEMM path runs it, with the weights this CPU's exact
kernel takes), timed on the engine's thread pool.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from edgellm.machine import machine_memory

PROBE_MIN = 64 << 20  # bytes: above any L2, the probe's floor


def decode_bytes(engine) -> dict:
    """What one decoded token reads: {"weights": bytes, "kv_per_position": bytes of K and V per
    position attended}. The weights as the engine holds them (engine.decode_weight_bytes)."""
    cfg = engine.config
    kv_item = engine.kv_bytes() // (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
                                    * engine.kv_cache_len * engine.slots)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_item
    return {"weights": engine.decode_weight_bytes(), "kv_per_position": kv}


def read_bandwidth(nbytes: int, threads: int | None, passes: int = 4) -> dict:
    """{"gb_s": bytes read per second, "probe_mb": buffer size}: the best of `passes` reads of a
    buffer of nbytes (at least PROBE_MIN, at most a quarter of the available memory) by
    `threads` threads (None: one per core), each reducing its own slice."""
    import os

    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    size = int(min(max(nbytes, PROBE_MIN), machine_memory()[1] // 4))
    buf = np.ones(size, np.uint8)  # written once: every page is resident before timing
    parts = np.array_split(buf, threads)
    best = float("inf")
    for _ in range(passes + 1):  # one more: a first pass may meet cold TLBs and caches
        workers = [threading.Thread(target=np.maximum.reduce, args=(p,)) for p in parts]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t)
    del buf, parts
    return {"gb_s": round(size / best / 1e9, 2), "probe_mb": round(size / 1e6), "threads": threads}


def gemm_ops(engine, rows: int, repeats: int = 5) -> dict | None:
    """{"gops": int8 multiply-adds x 2 per second, "shape": [rows, K, N]}: ONNX Runtime's
    MatMulInteger on the model's widest layer matrix (hidden -> intermediate), uint8 rows times
    the weights of the QGEMM path on this CPU (runtime.kernels), on the engine's thread pool;
    None for an engine without ONNX Runtime."""
    if not hasattr(engine, "ort"):
        return None
    from onnx import TensorProto, helper, numpy_helper

    from edgellm.runtime.kernels import qgemm_weights
    from edgellm.runtime.ort_engine import _session_options

    ort, cfg = engine.ort, engine.config
    k, n = cfg.hidden_size, cfg.intermediate_size
    # the weights of this CPU's exact kernel, whichever path the engine runs (u8 x s8 is faster
    # where it saturates, and not usable there)
    unsigned = engine.kernel.weights == "u8" if engine.kernel.path == "qgemm" \
        else qgemm_weights() == "u8"
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, (k, n), dtype=np.uint8) if unsigned else \
        rng.integers(-127, 128, (k, n), dtype=np.int8)
    zps = ["zp_a"] + (["zp_b"] if unsigned else [])
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.uint8(128), "zp_a")]
    if unsigned:
        inits.append(numpy_helper.from_array(np.uint8(128), "zp_b"))
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w", *zps], ["y"])], "gemm_probe",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), _session_options(ort, None),
                                   providers=["CPUExecutionProvider"])
    x = rng.integers(0, 256, (rows, k), dtype=np.uint8)
    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - t)
    return {"gops": round(2 * rows * k * n / best / 1e9, 1), "shape": [rows, k, n],
            "weights": "u8" if unsigned else "s8"}


def matmul_ops_per_token(cfg) -> int:
    """Multiply-adds x 2 of one token through the decoder layers' linears (the lm_head runs on
    a prompt's last token alone; attention's products are left out: small at 128 positions)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return 2 * cfg.num_layers * (d * (q + 2 * kv) + q * d + 3 * d * i)


def limits(engine, threads: int | None, decode_tok_s: float, prefill_tok_s: float,
           depth: int, prefill_rows: int) -> dict:
    """The fields `bench` reports beside its speeds: bytes per decoded token at `depth`
    positions (the mean depth of its decode), the measured read bandwidth, the roofline and
    decode's share of it; the integer GEMM's throughput and prefill's share of it."""
    per = decode_bytes(engine)
    total = per["weights"] + per["kv_per_position"] * depth
    bw = read_bandwidth(total, threads)
    roof = bw["gb_s"] * 1e9 / total
    out = {"bytes_per_token": total, "weight_bytes_per_token": per["weights"],
           "read_bandwidth_gb_s": bw["gb_s"], "bandwidth_probe_mb": bw["probe_mb"],
           "roofline_tok_s": round(roof, 2),
           "decode_of_roofline": round(decode_tok_s / roof, 3)}
    gemm = gemm_ops(engine, prefill_rows)
    if gemm is not None:
        ops = matmul_ops_per_token(engine.config) * prefill_tok_s / 1e9
        out.update(int8_gemm_gops=gemm["gops"], int8_gemm_shape=gemm["shape"],
                   prefill_gops=round(ops, 1), prefill_of_gemm=round(ops / gemm["gops"], 3))
    return out
