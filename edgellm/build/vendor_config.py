"""The vendor's `--model_config` JSON (config/qwen2-0.5B.json), checked against the source."""

from __future__ import annotations

import json
from pathlib import Path

from edgellm.arch.spec import ModelConfig
from edgellm.errors import EdgeLLMError

# vendor field -> ModelConfig attribute
_FIELDS = {
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads", "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
    "rope_theta_base": "rope_theta", "head_dim": "head_dim",
}


def check_vendor_config(path: str, cfg: ModelConfig) -> None:
    """Refuse a vendor model config that disagrees with the checkpoint (catches wrong files)."""
    try:
        vendor = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeLLMError(f"--model-config {path}: {e}") from None
    for key, attr in _FIELDS.items():
        if key in vendor and float(vendor[key]) != float(getattr(cfg, attr)):
            raise EdgeLLMError(f"--model-config {path}: {key} is {vendor[key]}, "
                               f"the checkpoint has {getattr(cfg, attr)}")
