"""Source reading details: config spellings, sharded checkpoints, vendor flags, check levels."""

from __future__ import annotations

import json

import pytest

from edgellm.arch import get_arch
from edgellm.errors import EdgeLLMError
from helpers import TINY, edgellm, make_tiny_model

BASE = {"model_type": "qwen2", **TINY}


def test_rope_theta_at_top_level_or_under_rope_parameters():
    spec = get_arch("qwen2")
    top = spec.config_from_hf(BASE | {"rope_theta": 1e6})
    nested = spec.config_from_hf({k: v for k, v in BASE.items() if k != "rope_theta"}
                                 | {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
    assert top.rope_theta == nested.rope_theta == 1e6
    assert top.rope_scaling is None and nested.rope_scaling is None


def test_unknown_config_keys_are_kept():
    cfg = get_arch("llama").config_from_hf(BASE | {"model_type": "llama", "my_flag": 3})
    assert cfg.extra["my_flag"] == 3


@pytest.mark.parametrize("bad,words", [
    ({"use_sliding_window": True}, "sliding"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"num_key_value_heads": 2}, "multiple"),
    ({"hidden_act": "gelu"}, "gelu"),
])
def test_unsupported_configs_are_refused(bad, words):
    with pytest.raises(EdgeLLMError, match=words):
        get_arch("qwen2").config_from_hf(BASE | bad)


def test_sharded_checkpoint_builds_the_same_artifact(tmp_path):
    import torch

    model = make_tiny_model(tmp_path / "one", "llama", tied=False)
    make_tiny_model(tmp_path / "sharded", "llama", tied=False)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    for name in ("one", "sharded"):
        done = edgellm("build", tmp_path / name, "-o", tmp_path / f"{name}-art")
        assert done.returncode == 0, done.stderr
    for f in ("layer_000.bin", "layer_001.bin", "post.bin", "model.embed_tokens.weight.bfloat16.bin"):
        assert (tmp_path / "one-art" / f).read_bytes() == (tmp_path / "sharded-art" / f).read_bytes()


def test_vendor_spellings_and_check_levels(tmp_path):
    make_tiny_model(tmp_path / "hf", "qwen2", tied=True)
    vendor = {"num_hidden_layers": 2, "hidden_size": 80, "num_attention_heads": 5}
    (tmp_path / "qwen.json").write_text(json.dumps(vendor))
    done = edgellm("build", "--input_path", tmp_path / "hf", "--output_path", tmp_path / "out",
                   "--kv_cache_len", "127", "--weight_type", "s8", "--hidden_state_type", "bf16",
                   "--prefill_len", "32", "--model_config", tmp_path / "qwen.json",
                   "--check_level", "2")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("layer output relative error") == 2
    assert "check prompt '1+1='" in done.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["kv_cache_len"], manifest["prefill_len"]) == (127, 32)


def test_vendor_config_that_disagrees_is_refused(tmp_path):
    make_tiny_model(tmp_path / "hf", "qwen2", tied=True)
    (tmp_path / "qwen.json").write_text(json.dumps({"num_hidden_layers": 24}))
    done = edgellm("build", tmp_path / "hf", "-o", tmp_path / "out",
                   "--model_config", tmp_path / "qwen.json")
    assert done.returncode == 1 and "num_hidden_layers is 24" in done.stderr
    assert not (tmp_path / "out").exists()
