"""K/V reused past a change in the middle of a prompt (a hub's device list with one state
changed): the runs of the new prompt found in a cached one after their first difference are
moved to their new positions, their keys rotated by the distance moved, and only the tokens
between them are computed. llama.cpp's server does the same with `--cache-reuse N` (shifting its
KV cache and re-rotating the keys), for runs that moved earlier; here they may move either way.

A moved run's K/V were computed beside the old text before it, not the new: an approximation
(measured in docs/PERFORMANCE.md); the tokens computed after the last run see everything."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict

import numpy as np

from edgellm import dtypes
from edgellm.arch.rope import inv_freq
from edgellm.runtime.reference import apply_rope

MIN_RUN = 64  # the default shortest run moved (serve, run and chat: --cache-reuse)
ANCHOR = 8  # tokens that must match to try a run there
CANDIDATES = 16  # places of one anchor tried (repeated text: a device list repeats much)
_TYPES = {np.dtype(t): kind for kind, t in dtypes.STORAGE_DTYPE.items()}  # K/V dtype -> kind


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def runs(old: list[int], new: list[int], start: int, min_run: int
         ) -> list[tuple[int, int, int]]:
    """(new position, old position, length): runs of new[start:] equal to old[start:], in the
    same order in both, each at least min_run long; at each position of new, the run at the
    earliest old position still free, taken whole. Bounded work on repetitive prompts: at most
    CANDIDATES places tried per position, each compared in numpy."""
    anchor = min(ANCHOR, min_run)
    places: dict[tuple, list[int]] = defaultdict(list)  # ascending
    for j in range(start, len(old) - anchor + 1):
        places[tuple(old[j:j + anchor])].append(j)
    a, b = np.asarray(old, np.int64), np.asarray(new, np.int64)
    found, i, free = [], start, start
    while i + min_run <= len(b):
        candidates = places.get(tuple(new[i:i + anchor]), [])
        first = bisect_left(candidates, free)
        for j in candidates[first:first + CANDIDATES]:
            if j + min_run <= len(a) and np.array_equal(a[j:j + min_run], b[i:i + min_run]):
                rest = min(len(a) - j, len(b) - i)
                differ = np.flatnonzero(a[j:j + rest] != b[i:i + rest])
                n = int(differ[0]) if len(differ) else rest
                found.append((i, j, n))
                i, free = i + n, j + n
                break
        else:
            i += 1
    return found


def moved_keys(k: np.ndarray, cfg, context: int, delta: int,
               scale: np.ndarray | None = None) -> np.ndarray:
    """Keys [layers, ..., head_dim] as rotated at their positions, rotated for positions
    `delta` further on (reference.apply_rope, each layer's own rotary frequencies at `context`):
    rotary angles add, and the longrope attention factor is in the keys already. An int8 cache's
    keys (runtime.kv_quant) are dequantized with `scale`, rotated and quantized again (a rotary
    pair shares its scale, so the rotation keeps its range)."""
    if delta == 0:
        return k
    if k.dtype == np.int8:
        from edgellm.runtime.kv_quant import dequantize, quantize

        if scale is None:
            raise ValueError("int8 keys are moved with their scale")
        x = dequantize(k, scale)
        return quantize(moved_keys(x, cfg, context, delta), scale)
    kind = _TYPES[k.dtype]
    x = dtypes.decode(k, kind)
    out = np.empty_like(x)
    for layer in range(k.shape[0]):
        freq, _ = inv_freq(cfg.layer_rope(layer), context)
        angles = (delta * freq)[None]  # [1, rotary_dim / 2]: one shift for every position
        out[layer] = apply_rope(x[layer], np.cos(angles).astype(np.float32),
                                np.sin(angles).astype(np.float32))
    return dtypes.encode(out, kind)
