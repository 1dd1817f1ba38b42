"""The numpy reference forward pass: the float math every engine is tested against.

Weights are float32 dicts keyed by canonical names (edgellm.arch.spec); activations are float32,
rounded through the hidden-state type where the vendor's per-layer parts hand them over (between
layers and in the KV cache).
"""

from __future__ import annotations

import math

import numpy as np

from edgellm import dtypes
from edgellm.arch.rope import rope_tables
from edgellm.arch.spec import ModelConfig


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(np.square(x), axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: [n, heads, head_dim]; rotates the two halves of each head's first 2*cos.shape[-1]
    dimensions (all of them unless the rotary is partial) and passes the rest through."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], axis=-1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int,
              scale: float | None = None, window: int | None = None) -> np.ndarray:
    """Causal grouped-query attention, softmax scale 1/sqrt(hd) unless given; with a window,
    a query sees only the keys at distance < window (itself included).

    q: [n, heads, hd] for positions pos..pos+n-1; k, v: [pos+n, kv_heads, hd] (the whole cache
    so far). Returns [n, heads*hd].
    """
    n, heads, hd = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qg = q.reshape(n, kv_heads, group, hd).transpose(1, 2, 0, 3)  # [kvh, group, n, hd]
    kt = k.transpose(1, 2, 0)  # [kvh, hd, T]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    scores = (qg @ kt[:, None]) * np.float32(scale)  # [kvh, group, n, T]
    distance = (pos + np.arange(n))[:, None] - np.arange(k.shape[0])[None, :]  # [n, T]
    hidden = (distance < 0) | (distance >= window) if window else distance < 0
    scores = np.where(hidden, -np.inf, scores)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    out = probs @ v.transpose(1, 0, 2)[:, None]  # [kvh, group, n, hd]
    return out.transpose(2, 0, 1, 3).reshape(n, heads * hd)


def linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    y = x @ w[name].T
    bias = w.get(f"{name}_bias")
    return y + bias if bias is not None else y


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (transformers' gelu_pytorch_tanh)."""
    return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi))
                                    * (x + np.float32(0.044715) * x * x * x)))


def gated_activation(gate: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if cfg.hidden_act == "gelu_tanh":
        return gelu_tanh(gate)
    return gate / (1.0 + np.exp(-gate))  # silu


def decoder_layer(h: np.ndarray, w: dict, cfg: ModelConfig, pos: int,
                  k_cache: np.ndarray, v_cache: np.ndarray, hidden_type: str, *,
                  layer: int) -> np.ndarray:
    """Decoder layer `layer` on h: [n, hidden] at positions pos.. ; updates the caches in place.

    k_cache, v_cache: [kv_cache_len, kv_heads, head_dim] in the hidden-state storage dtype; their
    length is the context the rotary tables are chosen for (longrope).
    """
    steps = decoder_layer_steps(h, w, cfg, pos, k_cache, v_cache, hidden_type, layer=layer)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


# The inputs decoder_layer_steps yields, in order, and the linears that read each.
LINEAR_INPUTS = {"attn_in": ("attn_q", "attn_k", "attn_v"), "attn_out": ("attn_out",),
                 "ffn_in": ("ffn_gate", "ffn_up"), "ffn_down": ("ffn_down",)}


def decoder_layer_steps(h: np.ndarray, w: dict, cfg: ModelConfig, pos: int,
                        k_cache: np.ndarray, v_cache: np.ndarray, hidden_type: str, *,
                        layer: int):
    """decoder_layer as a generator: yields (name, x) with the input x of each group of linears
    (LINEAR_INPUTS) before they read w, and returns the layer's output. GPTQ's calibration steps
    many sequences together and replaces each group's weights in w by their quantized values
    between two steps, so that later linears see the inputs the quantized ones give."""
    n = h.shape[0]
    hd, heads, kv_heads = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    x = rms_norm(h, w["attn_norm"], cfg.norm_eps)
    yield "attn_in", x
    q = linear(x, w, "attn_q").reshape(n, heads, hd)
    k = linear(x, w, "attn_k").reshape(n, kv_heads, hd)
    v = linear(x, w, "attn_v").reshape(n, kv_heads, hd)
    if cfg.qk_norm:  # over each head, before rope (Qwen3, Gemma 3)
        q = rms_norm(q, w["attn_q_norm"], cfg.norm_eps)
        k = rms_norm(k, w["attn_k_norm"], cfg.norm_eps)
    cos, sin = rope_tables(cfg.layer_rope(layer), np.arange(pos, pos + n), k_cache.shape[0])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache[pos:pos + n] = dtypes.encode(k, hidden_type)
    v_cache[pos:pos + n] = dtypes.encode(v, hidden_type)
    keys = dtypes.decode(k_cache[:pos + n], hidden_type)
    values = dtypes.decode(v_cache[:pos + n], hidden_type)
    residual = np.float32(cfg.residual_scale)  # MiniCPM's scale_depth / sqrt(layers), else 1
    attended = attention(q, keys, values, pos, cfg.attn_scale, cfg.window(layer))
    yield "attn_out", attended
    h = h + _branch_out(attended @ w["attn_out"].T, w, "attn_post_norm", cfg) * residual
    x = rms_norm(h, w["ffn_norm"], cfg.norm_eps)
    yield "ffn_in", x
    act = gated_activation(x @ w["ffn_gate"].T, cfg) * (x @ w["ffn_up"].T)
    yield "ffn_down", act
    h = h + _branch_out(act @ w["ffn_down"].T, w, "ffn_post_norm", cfg) * residual
    return dtypes.round_to(h.astype(np.float32), hidden_type)


def _branch_out(y: np.ndarray, w: dict, norm: str, cfg: ModelConfig) -> np.ndarray:
    """A branch's output as added to the residual stream: normed first with post_norms (Gemma)."""
    return rms_norm(y, w[norm], cfg.norm_eps) if cfg.post_norms else y


def post(h: np.ndarray, w: dict, cfg: ModelConfig) -> np.ndarray:
    """Final norm + lm_head: h [n, hidden] -> logits [n, vocab]."""
    x = rms_norm(h, w["output_norm"], cfg.norm_eps) * np.float32(cfg.logit_scale)
    return x @ w["lm_head"].T
