"""The integer weight layouts as ONNX Runtime reads them: MatMulNBits must dequantize exactly what
the numpy reference dequantizes (bits 4 and 8, symmetric and asymmetric, groups 32-128, widths
that do not divide into groups)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgellm.quant.schemes import get_scheme
from edgellm.runtime.ort_engine import _session_options

ort = pytest.importorskip("onnxruntime")


def _ort_dequantized(parts: dict, k: int, n: int, bits: int, group: int) -> np.ndarray:
    """W as MatMulNBits sees it: identity @ W.T at accuracy_level 0 (fp32 arithmetic)."""
    blocks = parts["qweight"].shape[1]
    inits = [numpy_helper.from_array(parts["qweight"], "qweight"),
             numpy_helper.from_array(parts["scales"].reshape(-1), "scales")]
    inputs = ["x", "qweight", "scales"]
    if "zero_points" in parts:
        inits.append(numpy_helper.from_array(parts["zero_points"], "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=group, accuracy_level=0)
    graph = helper.make_graph([node], "deq", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [k, k])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [k, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    assert parts["qweight"].shape == (n, blocks, group * bits // 8)
    # the engine's options: once an OrtEngine made the process-wide thread pool, every session
    # must use it
    session = ort.InferenceSession(model.SerializeToString(), _session_options(ort, 1),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(k, dtype=np.float32)})[0].T


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("name", ["s4", "s8"])
def test_matmulnbits_reads_exactly_our_dequantized_weights(name, group, symmetric):
    n, k = 37, 200  # 200 = 6 groups of 32 + 8: the last group padded
    w = (np.random.default_rng(group).normal(size=(n, k)) + 0.2).astype(np.float32)
    scheme = get_scheme(name, group, symmetric)
    parts = scheme.quantize(w)
    ours = scheme.dequantize(parts, k)
    theirs = _ort_dequantized(parts, k, n, scheme.bits, group)
    np.testing.assert_array_equal(theirs, ours)
    rms = np.sqrt(np.mean(np.square(ours - w))) / np.abs(w).max()
    assert rms < {4: 0.03, 8: 0.002}[scheme.bits]  # a third of a step of the widest group


def test_asymmetric_is_tighter_on_one_sided_weights():
    w = np.random.default_rng(0).uniform(0.0, 1.0, size=(16, 128)).astype(np.float32)
    err = {sym: np.abs(s.dequantize(s.quantize(w), 128) - w).max()
           for sym, s in ((sym, get_scheme("s4", 32, sym)) for sym in (True, False))}
    assert err[False] < 0.6 * err[True]  # 16 levels over [0, 1] instead of 8
