"""Python's share of a decode step: calls per token x the cost of one call, over the step time.

    python benchmarks/python_overhead.py ~/.cache/edgellm/artifacts/qwen2.5-coder-0.5b-instruct-s8

The cost of one call is measured on a trivial graph (Identity over the hidden state) bound the
same way as the engine's layers, so it is ORT's call overhead plus ours, without the math.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from onnx import TensorProto, helper

from edgellm.runtime.generator import Generator


def trivial_call_seconds(session_options, hidden: int, calls: int = 5000) -> float:
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, hidden])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), session_options,
                                   providers=["CPUExecutionProvider"])
    a, b = np.zeros((1, 1, hidden), np.float32), np.zeros((1, 1, hidden), np.float32)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(a))
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(b))
    t = time.perf_counter()
    for _ in range(calls):
        session.run_with_iobinding(binding)
    return (time.perf_counter() - t) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    from edgellm.runtime.ort_engine import _session_options

    gen = Generator.load(a.artifact, engine="ort", threads=a.threads)
    engine = gen.engine
    engine.forward(list(range(100, 164)), 0)
    steps = 64
    t = time.perf_counter()
    for pos in range(64, 64 + steps):
        engine.forward([5], pos)
    step = (time.perf_counter() - t) / steps
    calls = len(engine.layers) + 1
    call = trivial_call_seconds(_session_options(engine.ort, a.threads), gen.artifact.config.hidden_size)
    print(f"decode step {step * 1000:.2f} ms ({1 / step:.1f} tok/s); {calls} session calls per "
          f"token x {call * 1e6:.1f} us = {calls * call * 1000:.2f} ms "
          f"= {calls * call / step * 100:.1f}% of the step")


if __name__ == "__main__":
    main()
