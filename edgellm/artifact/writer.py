"""Streaming writer for one weight file: named tensors, aligned, hashed as they are written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edgellm.artifact.format import ALIGNMENT

DTYPE_NAMES = {np.dtype(np.uint8): "uint8", np.dtype(np.int8): "int8",
               np.dtype(np.uint16): "bf16", np.dtype(np.float16): "fp16",
               np.dtype(np.float32): "fp32"}


class TensorFileWriter:
    """Appends tensors to a file; `entry()` gives its size, sha256 and tensor table."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._sha = hashlib.sha256()
        self._offset = 0
        self.tensors: dict[str, dict] = {}

    def _write(self, data: bytes | memoryview):
        self._file.write(data)
        self._sha.update(data)
        self._offset += len(data)

    def add(self, name: str, array: np.ndarray):
        if name in self.tensors:
            raise ValueError(f"tensor {name} written twice to {self.path.name}")
        pad = -self._offset % ALIGNMENT
        if pad:
            self._write(b"\0" * pad)
        array = np.ascontiguousarray(array)
        self.tensors[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                              "offset": self._offset}
        self._write(memoryview(array).cast("B"))

    def close(self) -> dict:
        self._file.close()
        return {"size": self._offset, "sha256": self._sha.hexdigest(), "tensors": self.tensors}


def write_raw(path: Path, array: np.ndarray, convert=None, chunk_rows: int = 4096) -> dict:
    """A headerless row-major file (the embedding table), written in chunks of rows, each passed
    through `convert` first; returns the file's size and sha256."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:
        for start in range(0, array.shape[0], chunk_rows):
            rows = array[start:start + chunk_rows]
            block = memoryview(np.ascontiguousarray(convert(rows) if convert else rows)).cast("B")
            f.write(block)
            sha.update(block)
            size += len(block)
    return {"size": size, "sha256": sha.hexdigest(), "tensors": {}}
