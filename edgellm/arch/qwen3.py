"""Qwen3 (dense): the llama layout without q/k/v biases, with per-head RMS norms of q and k
before rope, and a head_dim set independently of the width (config.json / GGUF key_length)."""

from edgellm.arch import _tables as t
from edgellm.arch.spec import ArchSpec

SPEC = ArchSpec(
    name="qwen3",
    hf_layer={**t.HF_LAYER_NO_BIAS, **t.HF_QK_NORMS},
    hf_global=t.HF_GLOBAL,
    hf_ignored=t.HF_IGNORED,
    gguf_layer={**t.GGUF_LAYER_NO_BIAS, **t.GGUF_QK_NORMS},
    gguf_global=t.GGUF_GLOBAL,
    qkv_bias=False,
    gguf_qk_permuted=False,
    hf_extra=lambda cfg: {"qk_norm": True},
    gguf_extra=lambda meta: {"qk_norm": True},
)
