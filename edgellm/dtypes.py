"""bfloat16 and friends in plain numpy: numpy has no bf16, so it travels as uint16 bit patterns."""

from __future__ import annotations

import numpy as np

from edgellm.errors import EdgeLLMError


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even); NaN stays a quiet NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def bf16_bits_to_fp32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to(x: np.ndarray, hidden_type: str) -> np.ndarray:
    """x (float32) rounded through the hidden-state type and back to float32."""
    if hidden_type == "fp32":
        return x
    if hidden_type == "bf16":
        return bf16_bits_to_fp32(fp32_to_bf16_bits(x))
    if hidden_type == "fp16":
        return x.astype(np.float16).astype(np.float32)
    raise EdgeLLMError(f"unknown hidden-state type {hidden_type!r}")


# Storage dtype of a hidden-state type (bf16 is kept as its uint16 bits).
STORAGE_DTYPE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}
HIDDEN_STATE_TYPES = tuple(STORAGE_DTYPE)


def encode(x: np.ndarray, hidden_type: str) -> np.ndarray:
    """float32 -> the storage form of the hidden-state type."""
    if hidden_type == "bf16":
        return fp32_to_bf16_bits(x)
    return x.astype(STORAGE_DTYPE[hidden_type])


def decode(x: np.ndarray, hidden_type: str) -> np.ndarray:
    """Storage form of the hidden-state type -> float32."""
    if hidden_type == "bf16":
        return bf16_bits_to_fp32(x)
    return x.astype(np.float32)
