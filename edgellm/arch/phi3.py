"""Phi-3 / Phi-3.5 (mini, medium): llama layout with fused qkv_proj and gate_up_proj, which the
build splits by rows (q | k | v, gate | up); longrope ("su") scaling for the 128k variants;
a sliding window, honoured by refusing a KV cache longer than it."""

from edgellm.arch import _tables as t
from edgellm.arch.spec import ArchSpec

_UNFUSED = ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")  # read from the fused tensors


def _layers(table: dict) -> dict:
    return {k: v for k, v in table.items() if not k.endswith("_bias") and k not in _UNFUSED}


def _window(cfg: dict) -> dict:
    return {"sliding_window": cfg.get("sliding_window")}


def _window_gguf(meta: dict) -> dict:
    return {"sliding_window": meta.get("attention.sliding_window")}


SPEC = ArchSpec(
    name="phi3",
    hf_layer=_layers(t.HF_LAYER),
    hf_global=t.HF_GLOBAL,
    hf_ignored=t.HF_IGNORED,
    gguf_layer=_layers(t.GGUF_LAYER),
    gguf_global=t.GGUF_GLOBAL,
    qkv_bias=False,
    gguf_qk_permuted=False,
    hf_fused={"model.layers.{L}.self_attn.qkv_proj.weight": ("attn_q", "attn_k", "attn_v"),
              "model.layers.{L}.mlp.gate_up_proj.weight": ("ffn_gate", "ffn_up")},
    # llama.cpp keeps gate and up stacked in ffn_up, gate first
    gguf_fused={"blk.{L}.attn_qkv.weight": ("attn_q", "attn_k", "attn_v"),
                "blk.{L}.ffn_up.weight": ("ffn_gate", "ffn_up")},
    hf_extra=_window,
    gguf_extra=_window_gguf,
)
