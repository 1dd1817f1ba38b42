"""Qwen2 / Qwen2.5: llama layout plus q/k/v biases; rope in rotate-half form in both sources."""

from edgellm.arch import _tables as t
from edgellm.arch.spec import ArchSpec

SPEC = ArchSpec(
    name="qwen2",
    hf_layer=t.HF_LAYER,
    hf_global=t.HF_GLOBAL,
    hf_ignored=t.HF_IGNORED,
    gguf_layer=t.GGUF_LAYER,
    gguf_global=t.GGUF_GLOBAL,
    qkv_bias=True,
    gguf_qk_permuted=False,
)
