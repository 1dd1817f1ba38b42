"""Llama family (Llama-2/3, TinyLlama, SmolLM): no biases; GGUF q/k rows are interleaved for rope."""

from edgellm.arch import _tables as t
from edgellm.arch.spec import ArchSpec

SPEC = ArchSpec(
    name="llama",
    hf_layer=t.HF_LAYER_NO_BIAS,
    hf_global=t.HF_GLOBAL,
    hf_ignored=t.HF_IGNORED,
    gguf_layer=t.GGUF_LAYER_NO_BIAS,
    gguf_global=t.GGUF_GLOBAL,
    qkv_bias=False,
    gguf_qk_permuted=True,
)
