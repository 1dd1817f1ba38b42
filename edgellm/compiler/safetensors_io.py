"""Read safetensors checkpoints (sharded too) lazily, with bf16 support and truncation checks.

The `safetensors` package's numpy backend cannot return bfloat16, the dtype most checkpoints use,
so the (simple, documented) format is read here directly: 8-byte little-endian header length,
a JSON header of name -> dtype/shape/data_offsets, then the raw data, mapped with numpy.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.dtypes import bf16_bits_to_fp32
from edgellm.errors import EdgeLLMError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


@dataclass
class LazyTensor:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    def as_float32(self) -> np.ndarray:
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.start,
                        shape=(self.end - self.start,))
        array = raw.view(_DTYPES[self.dtype]).reshape(self.shape)
        if self.dtype == "BF16":
            return bf16_bits_to_fp32(array)
        return np.array(array, dtype=np.float32)


def read_header(path: Path) -> dict[str, LazyTensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise EdgeLLMError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise EdgeLLMError(f"{path}: truncated safetensors file (header cut off)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EdgeLLMError(f"{path}: not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise EdgeLLMError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = (8 + n + o for o in info["data_offsets"])
        if end > size:
            raise EdgeLLMError(f"{path}: truncated safetensors file (tensor {name} is cut off)")
        tensors[name] = LazyTensor(path, info["dtype"], tuple(info["shape"]), start, end)
    return tensors


class TorchTensor:
    """A tensor from pytorch_model.bin (loaded with weights_only=True)."""

    def __init__(self, tensor):
        self._t = tensor

    def as_float32(self) -> np.ndarray:
        return self._t.float().numpy()


def _open_pytorch_bin(files: list[Path]) -> dict:
    try:
        import torch
    except ImportError:
        raise EdgeLLMError(
            f"{files[0].parent} has only pytorch_model.bin weights; install torch to read them, "
            "or convert them to safetensors"
        ) from None
    out = {}
    for f in files:
        for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
            out[name] = TorchTensor(t)
    return out


def open_checkpoint(directory: Path) -> dict:
    """name -> lazy tensor for every weight file of a HF checkpoint directory."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the files (stray ones are ignored)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise EdgeLLMError(f"{index} is not a valid safetensors index") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise EdgeLLMError(f"{directory}: weight files named in the index are missing: "
                               f"{', '.join(missing)}")
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if bins:
            return _open_pytorch_bin(bins)
        raise EdgeLLMError(f"{directory}: no *.safetensors weight files")
    tensors: dict[str, LazyTensor] = {}
    for f in files:
        for name, t in read_header(f).items():
            if name in tensors:
                raise EdgeLLMError(f"{directory}: tensor {name} appears in two weight files")
            tensors[name] = t
    return tensors
