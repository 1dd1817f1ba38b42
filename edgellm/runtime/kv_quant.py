"""The int8 KV cache (`--cache-type int8`, opt-in, as llama.cpp's `-ctk q8_0` is): K and V held
as int8 with one scale per channel of each KV head (ONNX Runtime's GroupQueryAttention quantizes
what it writes and dequantizes what it reads, its T_CACHE int8 with k_scale / v_scale), a
quarter of the fp32 cache's bytes.

The scales are static (the kernel takes them as inputs): each channel's largest magnitude over a
calibration text run through the fp32 cache, / 127; a rotary pair's two channels share the
larger, as the rotation mixes them. They are measured once per artifact at the first load with
the int8 cache (a prefill of CALIBRATION_TOKENS tokens on an fp32 engine), then cached on disk
beside the kernel choices: a file is written whole or not at all, and one that is damaged or made
for another artifact is measured again, never used. The calibration text is edgellm's own
mixed.txt (prose, code in six languages, chat turns) in the model's chat template, so the
template's special tokens (whose keys are the largest) are among what it sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeLLMError

CACHE_TYPES = ("fp32", "int8")
CALIBRATION_TOKENS = 1024
VERSION = 1  # of the calibration: a change here measures every artifact again
TEXT = Path(__file__).resolve().parents[1] / "compiler" / "texts" / "mixed.txt"


def check(cache_type: str) -> str:
    if cache_type not in CACHE_TYPES:
        raise EdgeLLMError(f"--cache-type {cache_type}: no such cache type "
                           f"({', '.join(CACHE_TYPES)})")
    return cache_type


def quantize(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float K or V -> int8 with `scale` (broadcast), as the kernel rounds and saturates."""
    return np.clip(np.rint(x / scale), -128, 127).astype(np.int8)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale


def calibration_ids(artifact, limit: int = CALIBRATION_TOKENS) -> list[int]:
    """The calibration text in the model's chat template (a system and a user turn), cut to
    `limit` tokens (and to the model's trained context)."""
    from edgellm.text import ModelText

    text = ModelText.from_artifact(artifact)
    paragraphs = TEXT.read_text().split("\n\n")
    half = len(paragraphs) // 2
    ids = text.encode_chat([{"role": "system", "content": "\n\n".join(paragraphs[:half])},
                            {"role": "user", "content": "\n\n".join(paragraphs[half:])}])
    return ids[:min(limit, artifact.config.max_position_embeddings - 1)]


def from_peaks(cfg, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k, v) scales [layers, kv_heads, head_dim] float32 from each channel's largest magnitude
    over the calibration text: / 127, a rotary pair's two channels at the larger."""
    k = np.array(k, np.float32)
    half = (cfg.rotary_dim or cfg.head_dim) // 2
    pair = np.maximum(k[..., :half], k[..., half:2 * half])
    k[..., :half], k[..., half:2 * half] = pair, pair
    return tuple((np.maximum(x, 1e-6) / 127).astype(np.float32) for x in (k, np.asarray(v)))


def _key(artifact) -> dict:
    from edgellm.runtime.kernels import layout_key

    return {"version": VERSION, "layout": layout_key(artifact.manifest),
            "tokens": CALIBRATION_TOKENS,
            "text": hashlib.sha256(TEXT.read_bytes()).hexdigest()[:16]}


def _file(key: dict) -> Path:
    from edgellm.fileutil import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "kv-scales" / f"{digest}.npz"


def _digest(k: np.ndarray, v: np.ndarray) -> str:
    return hashlib.sha256(k.tobytes() + v.tobytes()).hexdigest()


def read_cached(key: dict, shape: tuple) -> tuple | None:
    """The scales cached for `key`, or None: none, damaged, or made for another key."""
    try:
        with np.load(_file(key), allow_pickle=False) as f:
            entry = json.loads(str(f["key"]))
            k, v = np.asarray(f["k"], np.float32), np.asarray(f["v"], np.float32)
            digest = str(f["sha256"])
    except (OSError, ValueError, KeyError, TypeError, EOFError):  # zipfile errors are these
        return None
    except Exception:  # noqa: BLE001 -- zipfile.BadZipFile and the like: never trusted
        return None
    if entry != key or k.shape != shape or v.shape != shape or digest != _digest(k, v):
        return None
    if not (np.isfinite(k).all() and np.isfinite(v).all() and (k > 0).all() and (v > 0).all()):
        return None
    return k, v


def write_cached(key: dict, k: np.ndarray, v: np.ndarray) -> None:
    """Written whole or not at all (a temporary file renamed over the entry)."""
    path = _file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, key=json.dumps(key), k=k, v=v, sha256=_digest(k, v))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: measured again next time, nothing else lost


def scales(artifact, peaks) -> tuple[np.ndarray, np.ndarray]:
    """The artifact's (k, v) scales [layers, kv_heads, head_dim]: cached, or measured now with
    peaks(ids) -> each channel's largest |K| and |V| over ids run through an fp32 cache."""
    cfg = artifact.config
    key = _key(artifact)
    shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    cached = read_cached(key, shape)
    if cached is not None:
        return cached
    ids = calibration_ids(artifact)
    print(f"edgellm: measuring the int8 KV cache's scales for {artifact.path.name} "
          f"({len(ids)} tokens, once; cached)", file=sys.stderr, flush=True)
    k, v = from_peaks(cfg, *peaks(ids))
    write_cached(key, k, v)
    return k, v
