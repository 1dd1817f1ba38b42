"""Qwen3 (dense): the llama layout without q/k/v biases, with per-head RMS norms of q and k
before rope, and a head_dim set independently of the width (config.json / GGUF key_length)."""

from edgellm.arch import _tables as t
from edgellm.arch.spec import ArchSpec

_NO_BIAS = {k: v for k, v in t.HF_LAYER.items() if not k.endswith("_bias")}
_GGUF_NO_BIAS = {k: v for k, v in t.GGUF_LAYER.items() if not k.endswith("_bias")}

SPEC = ArchSpec(
    name="qwen3",
    hf_layer={**_NO_BIAS, "attn_q_norm": "model.layers.{L}.self_attn.q_norm.weight",
              "attn_k_norm": "model.layers.{L}.self_attn.k_norm.weight"},
    hf_global=t.HF_GLOBAL,
    hf_ignored=t.HF_IGNORED,
    gguf_layer={**_GGUF_NO_BIAS, "attn_q_norm": "blk.{L}.attn_q_norm.weight",
                "attn_k_norm": "blk.{L}.attn_k_norm.weight"},
    gguf_global=t.GGUF_GLOBAL,
    qkv_bias=False,
    gguf_qk_permuted=False,
    hf_extra=lambda cfg: {"qk_norm": True},
    gguf_extra=lambda meta: {"qk_norm": True},
)
