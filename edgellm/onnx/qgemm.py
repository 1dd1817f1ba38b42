"""8-bit (and 4-bit) MatMulNBits re-laid at load for ONNX Runtime's integer GEMM: on Arm cores
without dotprod, and wherever it measures faster (runtime.kernels; on x86 it can be for prompt
chunks). A 4-bit weight is re-laid the same way, as int8 per output channel (its bytes double,
its rounding adds little: a per-channel int8 step is ~10x finer than a 4-bit group's), where
ONNX Runtime's 4-bit kernels are the slower ones: their prefill on a Zen 4 ran at 0.7x the
integer GEMM's, and on a Cortex-A53 (no dotprod) they are fp32 NEON kernels at 5x the
instructions per token of the re-layout (docs/PERFORMANCE.md).

ORT's 8-bit MatMulNBits kernels on aarch64 need dotprod; on a Cortex-A53 or A72 the op
dequantizes the whole weight on every call. ORT's MatMulInteger (MLAS QGEMM) has NEON kernels
built on widening multiplies that need no dotprod, but takes one weight scale per output
column, not per group. So each 8-bit weight is dequantized from its groups once, at load, and
quantized again per output channel (max|w| / 127, int8 [K, N]); each activation row is
quantized to uint8 with its own scale (max|x| / 127, zero point 128), the rows' scales and the
columns' multiply the int32 product back. Measured under emulation (benchmarks/arm/check.sh,
SmolLM2-135M): 61 M instructions per token on a Cortex-A53 instead of 1,776 M dequantizing.
Given a scratch directory, the re-laid weights go to an unlinked file there and reach ORT as
memory-mapped external initializers: ORT packs them into its own buffer, and the file's pages
are the kernel's to drop (inline in the graph, ORT kept them beside its packed copy: Qwen2.5-
Coder-0.5B s8 steady RSS 1.23 GB instead of 0.70 GB).

Layer graph, per 8-bit matmul y = x @ W.T (+ bias), x [b, n, K]:
    s = ReduceMax(|x|, last axis) / 127 + 1e-12            [b, n, 1], shared by q/k/v, gate/up
    xq = QuantizeLinear(x as [b * n, K], s, 128, axis=0)   uint8, back in x's shape
    y = Cast(MatMulInteger(xq, Wq, 128[, 128]), float) * s * w_scale (+ bias)

Wq is int8 where the CPU's u8 x s8 kernel is exact, or the same values + 128 as uint8 with zero
point 128 (weights="u8") where it is not: on x86 without VNNI, MLAS multiplies u8 by s8 with
vpmaddubsw, which adds two products into a saturating 16-bit lane (255 * 127 * 2 > 32767), and
the logits of a tiny model moved by 3.5x the tolerance of the reference test (issue 29). Its
u8 x u8 kernel widens to 16 bits first and is exact. runtime.kernels probes which one this CPU has.
"""

from __future__ import annotations

from pathlib import Path

import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgellm.onnx.graphs import external_tensor

_CONSTS = {"qgemm_inv127": np.float32(1 / 127), "qgemm_eps": np.float32(1e-12),
           "qgemm_flat": np.array([-1], np.int64), "qgemm_zp": np.uint8(128)}


def _nibbles(u: np.ndarray) -> np.ndarray:
    """4-bit values packed two to a byte, low nibble first (MatMulNBits), one to a byte."""
    return np.stack([u & 0x0F, u >> 4], axis=-1).reshape(*u.shape[:-1], -1)


def per_channel_int8(qweight: np.ndarray, scales: np.ndarray, k: int,
                     zero_points: np.ndarray | None = None,
                     rows: int = 1024, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits weights of `bits` 8 or 4 ([N, blocks, group * bits / 8] uint8, zero point
    2 ** (bits - 1) or one per group, packed as the weights are; scales [N * blocks]) -> int8
    [K, N] and one float32 scale per column [N]; `rows` output rows at a time, so the float32
    copy stays small (an lm_head's would be 4x its bytes)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    n, blocks, _ = qweight.shape
    scales = scales.reshape(n, blocks, 1)
    if zero_points is not None:
        zero_points = zero_points.reshape(n, -1)
        if bits == 4:
            zero_points = _nibbles(zero_points)
        zero_points = zero_points[:, :blocks, None]
    q, col = np.empty((k, n), np.int8), np.empty(n, np.float32)
    for r in range(0, n, rows):
        zp = float(2 ** (bits - 1)) if zero_points is None \
            else zero_points[r:r + rows].astype(np.float32)
        u = qweight[r:r + rows]
        w = ((_nibbles(u) if bits == 4 else u).astype(np.float32) - zp) * scales[r:r + rows]
        w = w.reshape(len(w), -1)[:, :k]
        c = np.abs(w).max(axis=1) / 127
        c[c == 0] = 1
        q[:, r:r + rows] = np.clip(np.rint(w / c[:, None]), -127, 127).T
        col[r:r + rows] = c
    return q, col


def _array(t: onnx.TensorProto, base: Path) -> np.ndarray:
    """An initializer's values; external ones mapped from their file, not copied."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.memmap(base / info["location"], dtype=dtype, mode="r",
                     offset=int(info.get("offset", 0)), shape=tuple(t.dims))


class _Rewriter:
    def __init__(self, graph, base: Path, scratch: Path | None, weights: str = "s8"):
        self.graph, self.base, self.scratch, self.unsigned = graph, base, scratch, weights == "u8"
        self.nodes, self.quantized = [], {}
        self.inits = {t.name: t for t in graph.initializer}
        self.external: dict[str, np.ndarray] = {}  # name -> read-only memmap of an unlinked file

    def weight(self, name: str, q: np.ndarray) -> onnx.TensorProto:
        """q as an initializer: inline, or (with a scratch directory) declared external and
        kept in self.external, memory-mapped from a file that is unlinked at once."""
        if self.scratch is None:
            return numpy_helper.from_array(q, name)
        self.scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self.scratch) as f:  # unlinked; the mapping keeps it
            f.write(memoryview(np.ascontiguousarray(q)).cast("B"))
            f.flush()
            self.external[name] = np.memmap(f, dtype=q.dtype, mode="r", shape=q.shape)
        return external_tensor(name, {"dtype": str(q.dtype), "shape": q.shape, "offset": 0},
                               "edgellm-qgemm")

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or f"qgemm_{op.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def rows_quantized(self, x: str) -> tuple[str, str]:
        """(uint8 x, its row scales [b, n, 1]), once per input tensor. The rows of every
        sequence of the batch are quantized as one [b * n, K] matrix (QuantizeLinear's
        per-axis scales take one axis) and put back in x's shape."""
        if x not in self.quantized:
            peak = self.node("ReduceMax", [self.node("Abs", [x])], axes=[-1], keepdims=1)
            scale = self.node("Add", [self.node("Mul", [peak, "qgemm_inv127"]), "qgemm_eps"])
            flat = self.node("Reshape", [scale, "qgemm_flat"])
            n_rows = self.node("Shape", [flat])  # [b * n]
            zp = self.node("Expand", ["qgemm_zp", n_rows])
            matrix = self.node("Reshape", [x, self.node("Concat", [n_rows, "qgemm_flat"],
                                                        axis=0)])  # [b * n, K]
            xq = self.node("QuantizeLinear", [matrix, flat, zp], axis=0)
            self.quantized[x] = self.node("Reshape", [xq, self.node("Shape", [x])]), scale
        return self.quantized[x]

    def array(self, name: str) -> np.ndarray:
        return _array(self.inits[name], self.base)

    def matmul(self, node) -> None:
        ins = list(node.input) + [""] * (6 - len(node.input))
        x, qweight, scales, zero_points, _, bias = ins
        attrs = {a.name: a.i for a in node.attribute}
        q, col = per_channel_int8(self.array(qweight), self.array(scales), attrs["K"],
                                  self.array(zero_points) if zero_points else None,
                                  bits=attrs["bits"])
        if self.unsigned:  # the same values + 128, read with zero point 128
            q = (q.view(np.uint8) ^ np.uint8(0x80))
        for name in filter(None, (qweight, scales, zero_points)):
            self.graph.initializer.remove(self.inits.pop(name))
        self.graph.initializer.extend([self.weight(f"{qweight}_kn", q),
                                       numpy_helper.from_array(col, f"{scales}_col")])
        xq, row_scale = self.rows_quantized(x)
        zps = ["qgemm_zp"] + (["qgemm_zp"] if self.unsigned else [])
        y = self.node("Cast", [self.node("MatMulInteger", [xq, f"{qweight}_kn", *zps])],
                      to=onnx.TensorProto.FLOAT)
        y = self.node("Mul", [self.node("Mul", [y, row_scale]), f"{scales}_col"],
                      None if bias else node.output[0])
        if bias:
            self.node("Add", [y, bias], node.output[0])


def is_int_matmul(node, bits: tuple[int, ...] = (4, 8)) -> bool:
    """A MatMulNBits of one of `bits` (what the re-layout takes)."""
    return node.op_type == "MatMulNBits" and any(a.name == "bits" and a.i in bits
                                                 for a in node.attribute)


def mapped(path: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The graph at `path` as it is, for ORT to load from memory (after changes: a context
    length, graphs.with_context), and its external initializers mapped from their files, to
    give it with SessionOptions.add_external_initializers."""
    model = onnx.load(str(path), load_external_data=False)
    return model, {t.name: _array(t, path.parent) for t in model.graph.initializer
                   if t.data_location == onnx.TensorProto.EXTERNAL}


def relayout(path: Path, scratch: Path | None = None, weights: str = "s8",
             bits: tuple[int, ...] = (4, 8)
             ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]] | None:
    """The graph at `path` with its MatMulNBits of `bits` on QGEMM, for ORT to load from memory,
    and the external initializers to give it (SessionOptions.add_external_initializers;
    none without `scratch`: every weight inline); None when it has no such matmul. The old
    weights are read from their files, never loaded whole into the graph. weights: "s8" (int8,
    zero point 0) or "u8" (uint8, zero point 128: for CPUs whose u8 x s8 kernel saturates)."""
    if weights not in ("s8", "u8"):
        raise ValueError(f"weights must be s8 or u8, not {weights!r}")
    model = onnx.load(str(path), load_external_data=False)
    if not any(is_int_matmul(n, bits) for n in model.graph.node):
        return None
    g = model.graph
    r = _Rewriter(g, path.parent, scratch, weights)
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in _CONSTS.items())
    for node in list(g.node):
        if is_int_matmul(node, bits):
            r.matmul(node)
        else:
            r.nodes.append(node)
    del g.node[:]
    g.node.extend(r.nodes)
    for t in g.initializer:  # what is left outside (norms, biases) is small: inline it
        if t.data_location == onnx.TensorProto.EXTERNAL and t.name not in r.external:
            t.raw_data = np.ascontiguousarray(_array(t, path.parent)).tobytes()
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    return model, r.external
