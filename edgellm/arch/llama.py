"""Llama family (Llama-2/3, TinyLlama, SmolLM): no biases; GGUF q/k rows are interleaved for rope."""

from edgellm.arch import _tables as t
from edgellm.arch.spec import ArchSpec

_NO_BIAS = {k: v for k, v in t.HF_LAYER.items() if not k.endswith("_bias")}
_GGUF_NO_BIAS = {k: v for k, v in t.GGUF_LAYER.items() if not k.endswith("_bias")}

SPEC = ArchSpec(
    name="llama",
    hf_layer=_NO_BIAS,
    hf_global=t.HF_GLOBAL,
    hf_ignored=t.HF_IGNORED,
    gguf_layer=_GGUF_NO_BIAS,
    gguf_global=t.GGUF_GLOBAL,
    qkv_bias=False,
    gguf_qk_permuted=True,
)
