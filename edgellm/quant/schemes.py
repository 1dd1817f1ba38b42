"""Quantization schemes for linear weights [out, in], in the layout ONNX Runtime's MatMulNBits reads.

Integer schemes are symmetric and group-wise along the input dimension: for each output row n
and group g of `group_size` input channels, scale[n, g] = max|w| / qmax and
q = clip(round(w / scale), -qmax - 1, qmax). q is stored offset by the zero point 2**(bits-1) as
unsigned bytes, `qweight: uint8 [out, n_groups, group_size * bits / 8]` (two 4-bit values per byte,
the lower index in the low nibble), with `scales: float32 [out, n_groups]`. The last group is
zero-padded when `in` does not divide. This is MatMulNBits' B / scales layout with its default
zero point, so the engine reads it without conversion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgellm.dtypes import bf16_bits_to_fp32, fp32_to_bf16_bits
from edgellm.errors import EdgeLLMError

Parts = dict[str, np.ndarray]


@dataclass(frozen=True)
class GroupwiseIntScheme:
    """Symmetric integer weights with one float32 scale per group of input channels per row."""

    name: str
    bits: int
    group_size: int = 128
    kind: str = "int"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"{self.name}: bits must be 4 or 8, not {self.bits}")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise ValueError(f"{self.name}: group_size must be a power of two >= 16")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def zero_point(self) -> int:
        return 2 ** (self.bits - 1)

    def n_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_size)

    def quantize(self, w: np.ndarray) -> Parts:
        out_f, in_f = w.shape
        g = self.n_groups(in_f)
        padded = np.zeros((out_f, g * self.group_size), np.float32)
        padded[:, :in_f] = w
        blocks = padded.reshape(out_f, g, self.group_size)
        scales = np.abs(blocks).max(axis=2) / self.qmax
        safe = np.where(scales == 0, 1.0, scales)
        q = np.clip(np.rint(blocks / safe[..., None]), -self.qmax - 1, self.qmax)
        u = (q + self.zero_point).astype(np.uint8)
        if self.bits == 4:
            u = u[..., 0::2] | (u[..., 1::2] << 4)
        return {"qweight": np.ascontiguousarray(u), "scales": scales.astype(np.float32)}

    def dequantize(self, parts: Parts, in_features: int) -> np.ndarray:
        u, scales = parts["qweight"], parts["scales"]
        if self.bits == 4:
            u = np.stack([u & 0x0F, u >> 4], axis=-1).reshape(*u.shape[:2], -1)
        q = u.astype(np.float32) - self.zero_point
        w = q * scales[..., None].astype(np.float32)
        return w.reshape(w.shape[0], -1)[:, :in_features]

    def to_dict(self) -> dict:
        return asdict(self) | {"symmetric": True, "zero_point": self.zero_point,
                               "scale_dtype": "fp32", "layout": "MatMulNBits"}


@dataclass(frozen=True)
class FloatScheme:
    """Weights kept as floats (bf16 as uint16 bit patterns, rounded to nearest even)."""

    name: str
    kind: str = "float"

    def __post_init__(self):
        if self.name not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"unknown float scheme {self.name!r}")

    def quantize(self, w: np.ndarray) -> Parts:
        if self.name == "bf16":
            return {"weight": fp32_to_bf16_bits(w)}
        return {"weight": w.astype(np.float16 if self.name == "fp16" else np.float32)}

    def dequantize(self, parts: Parts, in_features: int) -> np.ndarray:
        w = parts["weight"]
        return bf16_bits_to_fp32(w) if self.name == "bf16" else w.astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)


SCHEMES = {
    s.name: s
    for s in (
        GroupwiseIntScheme("s8", bits=8),
        GroupwiseIntScheme("s4", bits=4),
        FloatScheme("bf16"),
        FloatScheme("fp16"),
        FloatScheme("fp32"),
    )
}


def get_scheme(name: str, group_size: int | None = None):
    """A registered scheme by name, optionally with another group size (integer schemes)."""
    scheme = SCHEMES.get(name)
    if scheme is None:
        raise EdgeLLMError(f"unknown weight type {name!r}; choose from {', '.join(SCHEMES)}")
    if group_size is not None and isinstance(scheme, GroupwiseIntScheme):
        try:
            scheme = GroupwiseIntScheme(scheme.name, scheme.bits, group_size)
        except ValueError as e:
            raise EdgeLLMError(str(e)) from None
    return scheme


def scheme_from_dict(d: dict):
    if d.get("kind") == "int":
        return GroupwiseIntScheme(d["name"], d["bits"], d["group_size"])
    return FloatScheme(d["name"])


def worst_relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    """max |w - w_hat| / max |w|: the figure printed per tensor at build time."""
    scale = float(np.abs(w).max()) or 1.0
    return float(np.abs(w - w_hat).max()) / scale


def quantize_rows(scheme, w: np.ndarray, rows: int = 4096) -> tuple[Parts, float]:
    """scheme.quantize over blocks of rows (bounded temporaries for a 150k-row lm_head), and
    the worst relative error of the result."""
    chunks, worst_abs = [], 0.0
    for start in range(0, w.shape[0], rows):
        block = w[start:start + rows]
        parts = scheme.quantize(block)
        err = np.abs(block - scheme.dequantize(parts, w.shape[1])).max()
        worst_abs = max(worst_abs, float(err))
        chunks.append(parts)
    joined = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return joined, worst_abs / (float(np.abs(w).max()) or 1.0)
