"""Gemma 3 (text; transformers' Gemma3ForCausalLM, llama.cpp's `gemma3`), as formulated in
transformers' modeling_gemma3.py:

    h0      = embed(ids) * sqrt(hidden_size)
    h      += post_attention_norm(attn(input_norm(h)))        q, k: per-head RMS norms before rope
    h      += post_ffw_norm(down(gelu_tanh(gate(x)) * up(x)))  x = pre_ffw_norm(h)
    logits  = lm_head(norm(h)), lm_head tied to the embedding

Every RMSNorm scales by (1 + weight). llama.cpp's converter stores 1 + weight in the GGUF (its
`norm_shift`), which is the multiplier kept here; config.json checkpoints get the 1 added as they
are read (hf_norm_offset). The softmax scale is query_pre_attn_scalar^-0.5. Layers alternate
five sliding-window ones (keys at distance < sliding_window, rope base rope_local_base_freq,
no scaling) with one global one (rope_theta and its scaling).

GGUF metadata carries neither the activation, the layer pattern, the local rope base nor
query_pre_attn_scalar: llama.cpp hard-codes them for gemma3 (GELU-tanh, pattern 6, base 10000,
head_dim; hidden/heads for the 62 layers of 27B), and so does this spec, unless the file says
otherwise.
"""

import math

from edgellm.arch import _tables as t
from edgellm.arch.spec import ArchSpec
from edgellm.errors import EdgeLLMError

# the llama layout, q/k norms and the post norms; HF's post_attention_layernorm is the norm on
# the attention output here, and the FFN's input norm is pre_feedforward_layernorm
HF_LAYER = {**t.HF_LAYER_NO_BIAS, **t.HF_QK_NORMS,
            "attn_post_norm": "model.layers.{L}.post_attention_layernorm.weight",
            "ffn_norm": "model.layers.{L}.pre_feedforward_layernorm.weight",
            "ffn_post_norm": "model.layers.{L}.post_feedforward_layernorm.weight"}
GGUF_LAYER = {**t.GGUF_LAYER_NO_BIAS, **t.GGUF_QK_NORMS,
              "attn_post_norm": "blk.{L}.post_attention_norm.weight",
              "ffn_post_norm": "blk.{L}.post_ffw_norm.weight"}
PATTERN = 6  # every sixth layer global (Gemma3TextConfig's and llama.cpp's default)
LOCAL_THETA = 10000.0


def _windows(kinds: list[str], window: int) -> list:
    return [window if kind == "sliding_attention" else None for kind in kinds]


def _pattern(layers: int, pattern: int = PATTERN) -> list[str]:
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def _common(hidden: int, scalar: float, windows: list, local_theta: float) -> dict:
    return {"embed_scale": math.sqrt(hidden), "qk_norm": True, "post_norms": True,
            "attn_scale": float(scalar) ** -0.5, "layer_windows": windows,
            "rope_local_theta": float(local_theta)}


def _from_hf(cfg: dict) -> dict:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise EdgeLLMError(f"gemma3 with {key}={cfg[key]} is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise EdgeLLMError("gemma3 with use_bidirectional_attention is not a causal LM")
    layers = int(cfg["num_hidden_layers"])
    kinds = cfg.get("layer_types") or _pattern(layers,
                                               int(cfg.get("sliding_window_pattern", PATTERN)))
    unknown = set(kinds) - {"sliding_attention", "full_attention"}
    if unknown or len(kinds) != layers:
        got = sorted(unknown) or f"{len(kinds)} entries"
        raise EdgeLLMError(f"gemma3 layer_types must name each of the {layers} layers "
                           f"sliding_attention or full_attention (got {got})")
    local = ((cfg.get("rope_parameters") or {}).get("sliding_attention") or {}).get(
        "rope_theta", cfg.get("rope_local_base_freq", LOCAL_THETA))
    return _common(int(cfg["hidden_size"]), cfg.get("query_pre_attn_scalar", 256),
                   _windows(kinds, int(cfg.get("sliding_window") or 4096)), local)


def _from_gguf(meta: dict) -> dict:
    layers, hidden = int(meta["block_count"]), int(meta["embedding_length"])
    heads = int(meta["attention.head_count"])
    head_dim = int(meta.get("attention.key_length", hidden // heads))
    pattern = meta.get("attention.sliding_window_pattern", PATTERN)
    if isinstance(pattern, list):  # newer converters: a flag per layer
        kinds = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        kinds = _pattern(layers, int(pattern))
    window = meta.get("attention.sliding_window")
    if window is None:
        raise EdgeLLMError("GGUF metadata lacks gemma3.attention.sliding_window")
    scalar = hidden // heads if layers == 62 else head_dim  # llama.cpp: 27B scales by width
    return {**_common(hidden, scalar, _windows(kinds, int(window)),
                      meta.get("rope.freq_base_swa", LOCAL_THETA)),
            "hidden_act": "gelu_tanh"}  # GGUF metadata names no activation


SPEC = ArchSpec(
    name="gemma3",
    hf_layer=HF_LAYER,
    hf_global=t.HF_GLOBAL,
    hf_ignored=(),
    gguf_layer=GGUF_LAYER,
    gguf_global=t.GGUF_GLOBAL,
    qkv_bias=False,
    gguf_qk_permuted=False,  # llama.cpp runs Gemma's rope in rotate-half (NEOX) form
    tie_default=True,
    hf_extra=_from_hf,
    gguf_extra=_from_gguf,
    hf_norm_offset=1.0,
)
