"""MiniCPM-1/2 (openbmb): the llama layout with three scalars (muP-style), from the published
modelling code (modeling_minicpm.py, not in transformers):

    h0     = embed(ids) * scale_emb
    h     += attn(norm(h)) * scale_depth / sqrt(num_hidden_layers)      (and the same for the MLP)
    logits = lm_head(norm(h) / (hidden_size / dim_model_base))

Embeddings are tied by default. llama.cpp's converter writes the same three as
minicpm.embedding_scale, .residual_scale and .logit_scale (the last as a divisor).
"""

import dataclasses
import math

from edgellm.arch import llama


def _scales(cfg: dict) -> dict:
    # defaults of MiniCPMConfig
    return {"embed_scale": float(cfg.get("scale_emb", 1.0)),
            "residual_scale": float(cfg.get("scale_depth", 1.0))
            / math.sqrt(int(cfg["num_hidden_layers"])),
            "logit_scale": float(cfg.get("dim_model_base", 1.0)) / int(cfg["hidden_size"])}


def _scales_gguf(meta: dict) -> dict:
    return {"embed_scale": float(meta.get("embedding_scale", 1.0)),
            "residual_scale": float(meta.get("residual_scale", 1.0)),
            "logit_scale": 1.0 / float(meta.get("logit_scale", 1.0))}


SPEC = dataclasses.replace(llama.SPEC, name="minicpm", tie_default=True, hf_extra=_scales,
                           gguf_extra=_scales_gguf)
