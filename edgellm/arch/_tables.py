"""Tensor name tables shared by the llama-like families (HF and GGUF spellings)."""

HF_LAYER = {
    "attn_norm": "model.layers.{L}.input_layernorm.weight",
    "ffn_norm": "model.layers.{L}.post_attention_layernorm.weight",
    "attn_q": "model.layers.{L}.self_attn.q_proj.weight",
    "attn_k": "model.layers.{L}.self_attn.k_proj.weight",
    "attn_v": "model.layers.{L}.self_attn.v_proj.weight",
    "attn_out": "model.layers.{L}.self_attn.o_proj.weight",
    "ffn_gate": "model.layers.{L}.mlp.gate_proj.weight",
    "ffn_up": "model.layers.{L}.mlp.up_proj.weight",
    "ffn_down": "model.layers.{L}.mlp.down_proj.weight",
    "attn_q_bias": "model.layers.{L}.self_attn.q_proj.bias",
    "attn_k_bias": "model.layers.{L}.self_attn.k_proj.bias",
    "attn_v_bias": "model.layers.{L}.self_attn.v_proj.bias",
}
HF_GLOBAL = {
    "embed": "model.embed_tokens.weight",
    "output_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
HF_IGNORED = ("model.layers.{L}.self_attn.rotary_emb.inv_freq",)

GGUF_LAYER = {
    "attn_norm": "blk.{L}.attn_norm.weight",
    "ffn_norm": "blk.{L}.ffn_norm.weight",
    "attn_q": "blk.{L}.attn_q.weight",
    "attn_k": "blk.{L}.attn_k.weight",
    "attn_v": "blk.{L}.attn_v.weight",
    "attn_out": "blk.{L}.attn_output.weight",
    "ffn_gate": "blk.{L}.ffn_gate.weight",
    "ffn_up": "blk.{L}.ffn_up.weight",
    "ffn_down": "blk.{L}.ffn_down.weight",
    "attn_q_bias": "blk.{L}.attn_q.bias",
    "attn_k_bias": "blk.{L}.attn_k.bias",
    "attn_v_bias": "blk.{L}.attn_v.bias",
}
GGUF_GLOBAL = {
    "embed": "token_embd.weight",
    "output_norm": "output_norm.weight",
    "lm_head": "output.weight",
}

# the llama layout without q/k/v biases (Llama, Qwen3, Gemma 3)
HF_LAYER_NO_BIAS = {k: v for k, v in HF_LAYER.items() if not k.endswith("_bias")}
GGUF_LAYER_NO_BIAS = {k: v for k, v in GGUF_LAYER.items() if not k.endswith("_bias")}

# per-head q/k RMS norms (Qwen3, Gemma 3)
HF_QK_NORMS = {"attn_q_norm": "model.layers.{L}.self_attn.q_norm.weight",
               "attn_k_norm": "model.layers.{L}.self_attn.k_norm.weight"}
GGUF_QK_NORMS = {"attn_q_norm": "blk.{L}.attn_q_norm.weight",
                 "attn_k_norm": "blk.{L}.attn_k_norm.weight"}
