"""Quantization schemes for linear weights [out, in], in the layout ONNX Runtime's MatMulNBits reads.

Integer schemes are symmetric and group-wise along the input dimension: for each output row n
and group g of `group_size` input channels, scale[n, g] = max|w| / 127 (8-bit) or m / -8 with m
the group's largest-magnitude weight (4-bit, llama.cpp's Q4_0 rule: all 16 levels used), and
q = clip(round(w / scale), -qmax - 1, qmax). q is stored offset by the zero point 2**(bits-1) as
unsigned bytes, `qweight: uint8 [out, n_groups, group_size * bits / 8]` (two 4-bit values per byte,
the lower index in the low nibble), with `scales: float32 [out, n_groups]`. The last group is
zero-padded when `in` does not divide. This is MatMulNBits' B / scales layout with its default
zero point, so the engine reads it without conversion.

Asymmetric schemes (`symmetric=False`, `--asymmetric`) map each group's [min, max] onto
[0, 2**bits - 1]: scale = (max - min) / (2**bits - 1), zero point z = clip(round(-min / scale)),
q = clip(round(w / scale) + z, 0, 2**bits - 1), w ~ (q - z) * scale. The zero points are stored
as MatMulNBits reads them: `zero_points: uint8 [out, ceil(n_groups * bits / 8)]`, two 4-bit
values per byte, low nibble first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgellm.dtypes import bf16_bits_to_fp32, fp32_to_bf16_bits
from edgellm.errors import EdgeLLMError

Parts = dict[str, np.ndarray]


@dataclass(frozen=True)
class GroupwiseIntScheme:
    """Integer weights with one float32 scale (and, asymmetric, one zero point) per group of
    input channels per row."""

    name: str
    bits: int
    group_size: int = 128
    kind: str = "int"
    symmetric: bool = True

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

    def _blocks(self, w: np.ndarray) -> np.ndarray:
        out_f, in_f = w.shape
        g = self.n_groups(in_f)
        padded = np.zeros((out_f, g * self.group_size), np.float32)
        padded[:, :in_f] = w
        return padded.reshape(out_f, g, self.group_size)

    def _pack(self, u: np.ndarray) -> np.ndarray:
        """4-bit values two to a byte along the last axis (padded to even), low nibble first."""
        u = u.astype(np.uint8)
        if self.bits == 8:
            return np.ascontiguousarray(u)
        if u.shape[-1] % 2:
            u = np.concatenate([u, np.zeros((*u.shape[:-1], 1), u.dtype)], axis=-1)
        return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))

    def _unpack(self, u: np.ndarray, n: int) -> np.ndarray:
        if self.bits == 8:
            return u.astype(np.float32)
        both = np.stack([u & 0x0F, u >> 4], axis=-1).reshape(*u.shape[:-1], -1)
        return both[..., :n].astype(np.float32)

    def group_params(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Round-to-nearest parameters of blocks [..., group_size]: (scales, zero points), the
        zero points None for a symmetric scheme."""
        if self.symmetric:
            return self._symmetric_scales(blocks).astype(np.float32), None
        top = 2 ** self.bits - 1
        lo = np.minimum(blocks.min(axis=-1), 0)
        hi = np.maximum(blocks.max(axis=-1), 0)
        scales = ((hi - lo) / top).astype(np.float32)
        return scales, np.clip(np.rint(-lo / np.where(scales == 0, 1.0, scales)), 0, top)

    def round(self, w: np.ndarray, scales: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
        """w [..., k] onto the grid of (scales, zero) [..., 1 or k]: the stored integers."""
        safe = np.where(scales == 0, 1.0, scales)
        if zero is None:
            return np.clip(np.rint(w / safe), -self.qmax - 1, self.qmax) + self.zero_point
        return np.clip(np.rint(w / safe) + zero, 0, 2 ** self.bits - 1)

    def grid_values(self, q: np.ndarray, scales: np.ndarray,
                    zero: np.ndarray | None) -> np.ndarray:
        """The weights the stored integers q stand for."""
        return (q - (self.zero_point if zero is None else zero)) * scales

    def encode(self, w: np.ndarray, scales: np.ndarray, zero: np.ndarray | None) -> Parts:
        """w [out, in] rounded onto given per-group scales (and zero points) [out, n_groups]."""
        zero_b = None if zero is None else zero[..., None]
        q = self.round(self._blocks(w), scales[..., None], zero_b)
        parts = {"qweight": self._pack(q), "scales": scales.astype(np.float32)}
        if zero is not None:
            parts["zero_points"] = self._pack(zero)
        return parts

    def quantize(self, w: np.ndarray) -> Parts:
        """Round to nearest, with each group's scale from its largest magnitude (symmetric) or
        its range (asymmetric)."""
        return self.encode(w, *self.group_params(self._blocks(w)))

    def _symmetric_scales(self, blocks: np.ndarray) -> np.ndarray:
        """8-bit: max|w| / 127. 4-bit: the group's largest-magnitude weight m maps to -8 (scale
        m / -8, negative when m is positive), as llama.cpp's Q4_0 does: all 16 levels are used
        and the step is 7/8 of max|w| / 7's; weights of the other sign beyond 7/8 of |m| clip to
        7 steps. (At 8 bits the unused level is worth 0.4% of the step, so s8 keeps max|w| / 127
        and its artifacts stay as they were.)"""
        if self.bits == 8:
            return np.abs(blocks).max(axis=-1) / self.qmax
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        return np.take_along_axis(blocks, idx, axis=-1)[..., 0] / -(self.qmax + 1)

    def dequantize(self, parts: Parts, in_features: int) -> np.ndarray:
        u, scales = parts["qweight"], parts["scales"]
        q = self._unpack(u, self.group_size)
        if self.symmetric:
            q = q - self.zero_point
        else:
            q = q - self._unpack(parts["zero_points"], scales.shape[1])[..., None]
        w = q * scales[..., None].astype(np.float32)
        return w.reshape(w.shape[0], -1)[:, :in_features]

    def to_dict(self) -> dict:
        zero = self.zero_point if self.symmetric else "per group (zero_points)"
        return asdict(self) | {"zero_point": zero, "scale_dtype": "fp32",
                               "layout": "MatMulNBits"}


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


# What `--weight-type s4` means when nothing else is said: the best measured size/quality
# trade-off (docs/QUALITY.md, Qwen2.5-Coder-0.5B, whole text: group 32, a zero point per group
# and an s8 lm_head give +9.3% perplexity and KL 0.070, where group 128 all-s4 gives +18.4%
# and KL 0.206; the s8 lm_head takes s8's own layout, layout_schemes). Other types: group 128,
# symmetric, the lm_head like the layers.
LAYOUT_DEFAULTS = {"s4": {"group_size": 32, "asymmetric": True, "post_weight_type": "s8"}}


def layout_defaults(weight_type: str) -> dict:
    """group_size, asymmetric and post_weight_type for a build that names only its type."""
    return LAYOUT_DEFAULTS.get(weight_type, {"group_size": 128, "asymmetric": False,
                                             "post_weight_type": weight_type})


def layout_schemes(weight_type: str, other_types: tuple[str, ...], group_size: int | None,
                   symmetric: bool) -> list:
    """The layers' scheme, then one per name in other_types (the lm_head's, kept layers'):
    group_size and symmetric describe the layers' type; a part of another type takes that
    type's own defaults (an s4 build's s8 lm_head: group 128, symmetric, the s8 layout,
    which is as exact as the source and reads faster than groups of 32: docs/PERFORMANCE.md)."""
    def scheme(name: str):
        if name == weight_type:
            return get_scheme(name, group_size, symmetric)
        own = layout_defaults(name)
        return get_scheme(name, own["group_size"], not own["asymmetric"])

    return [scheme(weight_type), *(scheme(t) for t in other_types)]


def get_scheme(name: str, group_size: int | None = None, symmetric: bool = True):
    """A registered scheme by name, optionally with another group size or asymmetric
    (integer schemes)."""
    scheme = SCHEMES.get(name)
    if scheme is None:
        raise EdgeLLMError(f"unknown weight type {name!r}; choose from {', '.join(SCHEMES)}")
    if isinstance(scheme, GroupwiseIntScheme):
        try:
            scheme = GroupwiseIntScheme(scheme.name, scheme.bits, group_size or scheme.group_size,
                                        symmetric=symmetric)
        except ValueError as e:
            raise EdgeLLMError(str(e)) from None
    return scheme


def scheme_from_dict(d: dict):
    if d.get("kind") == "int":
        return GroupwiseIntScheme(d["name"], d["bits"], d["group_size"],
                                  symmetric=d.get("symmetric", True))
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
