"""Rotary position embedding: inverse frequencies and cos/sin tables for every supported scaling.

Scalings (HF `rope_scaling` / `rope_parameters`, formulas as in transformers'
modeling_rope_utils.py):
- default: inv_freq[i] = theta^(-2i/d), d = rotary_dim.
- linear: positions divided by `factor`.
- llama3 (Llama-3.1/3.2): low frequencies (wavelength > original_ctx / low_freq_factor) divided
  by `factor`, high ones (wavelength < original_ctx / high_freq_factor) kept, the band between
  interpolated smoothly.
- longrope (Phi-3 "su"): inv_freq[i] = 1 / (ext[i] * theta^(2i/d)), ext = long_factor when the
  context exceeds original_max_position_embeddings, else short_factor; cos and sin multiplied by
  sqrt(1 + ln(factor) / ln(original_ctx)). transformers switches per forward call on the longest
  position; a fixed KV cache cannot re-rotate cached keys, so the choice here is made once from the
  context (kv_cache_len), as llama.cpp does from n_ctx. The two agree whenever a whole sequence is
  run at once.
- freq_factors (Llama-3.1/3.2 GGUFs): inv_freq[i] = theta^(-2i/d) / factors[i], the divisors
  llama.cpp's converter stores as the `rope_freqs` tensor (for llama3 scaling, the same values
  the llama3 rule gives).
"""

from __future__ import annotations

import math

import numpy as np

SUPPORTED = ("default", "linear", "llama3", "longrope", "freq_factors")


def rotary_dim(cfg) -> int:
    return cfg.rotary_dim or cfg.head_dim


def _llama3(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return np.where(medium, smoothed, scaled)


def _longrope(cfg, exponents: np.ndarray, context_len: int) -> tuple[np.ndarray, float]:
    s = cfg.rope_scaling
    original = int(s["original_max_position_embeddings"])
    factor = s.get("factor") or cfg.max_position_embeddings / original
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = np.asarray(s["long_factor" if context_len > original else "short_factor"], np.float64)
    return 1.0 / (ext * cfg.rope_theta ** exponents), float(attention)


def inv_freq(cfg, context_len: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rotary_dim / 2] and the factor applied to cos and sin."""
    dim = rotary_dim(cfg)
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "longrope":
        return _longrope(cfg, exponents, context_len)
    freq = 1.0 / cfg.rope_theta ** exponents
    if kind == "linear":
        freq = freq / float(scaling["factor"])
    elif kind == "llama3":
        freq = _llama3(freq, scaling)
    elif kind == "freq_factors":
        freq = freq / np.asarray(scaling["factors"], np.float64)
    return freq, 1.0


def rope_tables(cfg, positions: np.ndarray, context_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: [n, rotary_dim / 2] for absolute positions (rotate-half convention)."""
    freq, attention = inv_freq(cfg, context_len)
    angles = np.outer(positions.astype(np.float64), freq)
    return ((np.cos(angles) * attention).astype(np.float32),
            (np.sin(angles) * attention).astype(np.float32))
