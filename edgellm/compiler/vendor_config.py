"""The vendor's model-config JSON (`--model_config config/qwen2-0.5B.json`): read as an override
of the source's config, and written back for an artifact (`inspect --vendor-config`).

Fields (pulsar2's llm_build): model_name, model_type (qwen / llama / minicpm / phi3),
num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size, intermediate_size,
vocab_size, rope_theta_base, max_position_embedings (sic; the correct spelling is accepted too),
rope_partial_factor, norm_eps, norm_type (rms_norm), hidden_act (silu); newer versions add
head_dim, scale_emb, scale_depth, dim_model_base (MiniCPM) and rope_scaling.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from edgellm.arch.spec import ModelConfig
from edgellm.errors import EdgeLLMError

# vendor field -> ModelConfig attribute, for the fields that map one to one
_DIRECT = {
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads", "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
    "head_dim": "head_dim", "rope_theta_base": "rope_theta", "norm_eps": "norm_eps",
    "max_position_embedings": "max_position_embeddings",
    "max_position_embeddings": "max_position_embeddings",
}
_MODEL_TYPES = {"qwen": "qwen2", "qwen2": "qwen2", "llama": "llama", "minicpm": "minicpm",
                "phi3": "phi3"}


def read_vendor_config(path: str) -> dict:
    try:
        vendor = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeLLMError(f"--model-config {path}: {e}") from None
    if not isinstance(vendor, dict):
        raise EdgeLLMError(f"--model-config {path}: not a JSON object")
    return vendor


def apply_vendor_config(vendor: dict, cfg: ModelConfig, where: str = "--model-config"
                        ) -> ModelConfig:
    """cfg with the vendor file's fields taking precedence (a wrong file then fails the
    tensor-shape checks with a clear message)."""
    kind = vendor.get("model_type")
    if kind is not None and _MODEL_TYPES.get(kind) != cfg.arch:
        raise EdgeLLMError(f"{where}: model_type {kind!r} does not match the source's "
                           f"architecture {cfg.arch!r}")
    if vendor.get("norm_type", "rms_norm") != "rms_norm":
        raise EdgeLLMError(f"{where}: norm_type {vendor['norm_type']!r} is not supported")
    try:
        changes = {attr: type(getattr(cfg, attr))(vendor[key])
                   for key, attr in _DIRECT.items() if key in vendor}
        layers = changes.get("num_layers", cfg.num_layers)
        hidden = changes.get("hidden_size", cfg.hidden_size)
        if "hidden_act" in vendor:
            changes["hidden_act"] = vendor["hidden_act"]
        if "rope_partial_factor" in vendor:
            dim = int(changes.get("head_dim", cfg.head_dim) * float(vendor["rope_partial_factor"]))
            changes["rotary_dim"] = None if dim == changes.get("head_dim", cfg.head_dim) else dim
        if "rope_scaling" in vendor:
            changes["rope_scaling"] = vendor["rope_scaling"] or None
        if "scale_emb" in vendor:
            changes["embed_scale"] = float(vendor["scale_emb"])
        if "scale_depth" in vendor:
            changes["residual_scale"] = float(vendor["scale_depth"]) / math.sqrt(layers)
        if "dim_model_base" in vendor:
            changes["logit_scale"] = float(vendor["dim_model_base"]) / hidden
        return dataclasses.replace(cfg, **changes)
    except (TypeError, ValueError) as e:
        raise EdgeLLMError(f"{where}: a field has the wrong type: {e}") from None


def vendor_config(cfg: ModelConfig, model_name: str) -> dict:
    """The vendor's model-config JSON describing cfg."""
    out = {
        "model_name": model_name,
        "model_type": "qwen" if cfg.arch == "qwen2" else cfg.arch,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "hidden_size": cfg.hidden_size,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size, "rope_theta_base": cfg.rope_theta,
        "max_position_embedings": cfg.max_position_embeddings,
        "rope_partial_factor": (cfg.rotary_dim or cfg.head_dim) / cfg.head_dim,
        "norm_eps": cfg.norm_eps, "norm_type": "rms_norm", "hidden_act": cfg.hidden_act,
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = cfg.rope_scaling
    if cfg.arch == "minicpm":
        out["scale_emb"] = cfg.embed_scale
        out["scale_depth"] = cfg.residual_scale * math.sqrt(cfg.num_layers)
        out["dim_model_base"] = cfg.logit_scale * cfg.hidden_size
    return out
