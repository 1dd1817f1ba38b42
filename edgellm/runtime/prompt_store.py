"""Prompt KV caches kept on disk, so that a long shared prefix (an agent's or a home hub's system
prompt and tool list) is not prefilled again after a restart (issue 30).

One file per stored prefix, `<hash of its token ids>.kv`, under DIR/<artifact identity>/ (so
several models can share DIR): the magic line, a JSON header (format version, identity, token
ids, array shapes and dtype, sha256 of the payload) and the K and V arrays as they are in the
engine. The identity hashes the artifact's manifest (its files' checksums: a rebuilt artifact
never reads an old cache), the engine and the kernel path (runtime.kernels: the K/V one path
computes differ in rounding from another's). A file is written whole to a temporary name and
renamed, so a crash or a full disk leaves no file that is read later; one that is truncated,
damaged (its checksum), of another format version or another identity is removed with one
warning line, never used. Files beyond `max_bytes` are removed, least recently used first.
Nothing but token ids and their K/V is written; the directory is owner-only (0700), as prompts
may hold private data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeLLMError
from edgellm.runtime.cache_reuse import common_prefix

MAGIC = b"EDGELLM-KV\n"
VERSION = 1


def identity(gen) -> str:
    """What a stored K/V depends on: the artifact's manifest, the engine, the kernel path, the
    rotary frequencies at the context it runs with (longrope picks them by the context), and the
    cache's type with its scales (an int8 cache's K/V are stored as int8, runtime.kv_quant)."""
    from edgellm.arch.rope import inv_freq

    engine = gen.engine
    kernel = getattr(engine, "kernel", None)
    cfg = gen.artifact.config
    rope = [inv_freq(cfg.layer_rope(layer), engine.kv_cache_len)
            for layer in range(cfg.num_layers)]
    parts = [(gen.artifact.path / "manifest.json").read_bytes(),
             type(getattr(getattr(engine, "batcher", None), "engine", engine)).__name__.encode(),
             (kernel.path if kernel else "").encode(), (kernel.weights if kernel else "").encode(),
             b"".join(np.asarray(f, np.float64).tobytes() + np.float64(a).tobytes()
                      for f, a in rope)]
    cache_type = getattr(engine, "cache_type", "fp32")
    if cache_type != "fp32":  # (an fp32 cache's identity as it was before int8 caches)
        parts += [cache_type.encode(), *(np.ascontiguousarray(getattr(engine, s)).tobytes()
                                         for s in ("key_scale", "value_scale"))]
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little") + p)
    return h.hexdigest()[:32]


def positions(a: np.ndarray, start: int, stop: int, axis: int) -> np.ndarray:
    """Positions start..stop-1 of a K or V array along `axis`: a view, not a copy."""
    return a[(slice(None),) * axis + (slice(start, stop),)]


def _warn(text: str) -> None:
    print(f"edgellm: warning: {text}", file=sys.stderr, flush=True)


class PromptStore:
    """The stored prefixes of one artifact and engine, under `directory`."""

    def __init__(self, directory: str | Path, ident: str, max_bytes: int = 2 << 30,
                 min_tokens: int = 64):
        self.root = Path(directory)
        self.ident, self.max_bytes, self.min_tokens = ident, max_bytes, min_tokens
        self.dir = self.root / ident
        self.dir.mkdir(parents=True, exist_ok=True)
        for d in (self.root, self.dir):
            os.chmod(d, 0o700)
        self.lock = threading.Lock()
        self.index: dict[str, list[int]] = {}  # file name -> token ids
        self.loads = self.saves = 0
        for path in sorted(self.dir.glob("*.kv")):
            header = self._header(path)
            if header is not None:
                self.index[path.name] = header["ids"]
        for stray in self.dir.glob(".*.tmp"):  # a write that a crash cut short
            stray.unlink(missing_ok=True)

    @staticmethod
    def name(ids: list[int]) -> str:
        return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:40] + ".kv"

    def _drop(self, path: Path, why: str) -> None:
        _warn(f"prompt cache file {path} {why}: ignored and removed")
        path.unlink(missing_ok=True)
        self.index.pop(path.name, None)

    def _header(self, path: Path) -> dict | None:
        """The header of a stored prefix if its file is whole and this store's, else None (and
        the file removed)."""
        try:
            with open(path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    return self._drop(path, "is not a prompt cache file")
                (size,) = struct.unpack("<I", f.read(4))
                header = json.loads(f.read(size))
            if header.get("version") != VERSION:
                return self._drop(path, f"has format version {header.get('version')!r}, "
                                        f"not {VERSION}")
            if header.get("identity") != self.ident:
                return self._drop(path, "was made for another artifact or engine")
            want = len(MAGIC) + 4 + size + header["payload_bytes"]
            if path.stat().st_size != want or self.name(header["ids"]) != path.name:
                return self._drop(path, "is truncated or renamed")
            header["offset"] = len(MAGIC) + 4 + size
            return header
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            if isinstance(e, FileNotFoundError):
                return None
            return self._drop(path, f"is damaged ({type(e).__name__})")

    def best(self, ids: list[int]) -> tuple[int, str | None]:
        """(n, file name): the stored prefix sharing the most leading tokens with ids; of
        several, the longest (what follows a change may still be in it: runtime.cache_reuse)."""
        best, name, length = 0, None, 0
        with self.lock:
            entries = list(self.index.items())
        for file, stored in entries:
            n = common_prefix(stored, ids)
            if n > best or (n == best and n and len(stored) > length):
                best, name, length = n, file, len(stored)
        return best, name

    def load(self, file: str, n: int, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The first n positions of a stored K/V (positions along `axis`), checked against its
        checksum; None (and the file removed) when it is damaged. Views of the file mapped
        read-only, not copies (a 3,000-token prefix of the 0.5B is 74 MB: copying it twice
        cost 0.25 s of a restart's first request on the AVX2-only host); a file replaced or
        removed later leaves the mapping as it was read."""
        import mmap

        path = self.dir / file
        header = self._header(path)
        if header is None:
            return None
        try:
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            return self._drop(path, f"cannot be read ({getattr(e, 'strerror', None) or e})")
        payload = memoryview(mapped)[header["offset"]:header["offset"] + header["payload_bytes"]]
        if len(payload) != header["payload_bytes"] or \
                hashlib.sha256(payload).hexdigest() != header["sha256"]:
            return self._drop(path, "is damaged (checksum)")
        dtype = np.dtype(header["dtype"])
        k_shape, v_shape = tuple(header["k_shape"]), tuple(header["v_shape"])
        k_bytes = int(np.prod(k_shape)) * dtype.itemsize
        k = np.frombuffer(payload, dtype, offset=0, count=int(np.prod(k_shape))).reshape(k_shape)
        v = np.frombuffer(payload, dtype, offset=k_bytes,
                          count=int(np.prod(v_shape))).reshape(v_shape)
        os.utime(path)  # most recently used
        self.loads += 1
        return positions(k, 0, n, axis), positions(v, 0, n, axis)

    def has(self, ids: list[int]) -> bool:
        return self.name(ids) in self.index

    def save(self, ids: list[int], kv: tuple[np.ndarray, np.ndarray]) -> bool:
        """Store the K/V of ids (written whole or not at all); False where the disk refused."""
        k, v = (np.ascontiguousarray(a) for a in kv)
        payload_bytes = k.nbytes + v.nbytes
        digest = hashlib.sha256()
        digest.update(memoryview(k).cast("B"))
        digest.update(memoryview(v).cast("B"))
        header = json.dumps({"version": VERSION, "identity": self.ident, "ids": list(ids),
                             "dtype": k.dtype.str, "k_shape": k.shape, "v_shape": v.shape,
                             "payload_bytes": payload_bytes,
                             "sha256": digest.hexdigest()}).encode()
        path = self.dir / self.name(ids)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(header)) + header)
                f.write(memoryview(k).cast("B"))
                f.write(memoryview(v).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except OSError as e:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            _warn(f"prompt cache: could not write {path} ({e.strerror or e}); not cached")
            return False
        with self.lock:
            self.index[path.name] = list(ids)
        self.saves += 1
        self._evict(keep=path.name)
        return True

    def _evict(self, keep: str) -> None:
        """Remove the least recently used files until the store fits in max_bytes."""
        files = []
        for name in list(self.index):
            try:
                st = (self.dir / name).stat()
            except OSError:
                self.index.pop(name, None)
                continue
            files.append((st.st_mtime, st.st_size, name))
        total = sum(size for _, size, _ in files)
        for _, size, name in sorted(files):
            if total <= self.max_bytes:
                break
            if name == keep:
                continue
            (self.dir / name).unlink(missing_ok=True)
            with self.lock:
                self.index.pop(name, None)
            total -= size


def open_store(gen, directory: str | Path, max_bytes: int) -> PromptStore:
    """The store on disk for gen's artifact and engine (`--prompt-cache DIR` of serve, run and
    chat), or a one-line error where the directory cannot be made or written."""
    try:
        return PromptStore(directory, identity(gen), max_bytes,
                           min_tokens=min(64, gen.engine.prefill_len))
    except OSError as e:
        raise EdgeLLMError(f"--prompt-cache {directory}: {e.strerror or e}") from None
