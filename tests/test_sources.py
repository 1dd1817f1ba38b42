"""Source reading details: config spellings, sharded checkpoints, vendor flags, check levels."""

from __future__ import annotations

import json
import re

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
    assert re.search(r"check quality on a short text: perplexity [\d.]+ over \d+ tokens .*"
                     r"top-1 agreement [\d.]+%; mean KL [\d.]+ nats", done.stderr), done.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["kv_cache_len"], manifest["prefill_len"]) == (127, 32)


def test_vendor_config_that_disagrees_is_refused(tmp_path):
    make_tiny_model(tmp_path / "hf", "qwen2", tied=True)
    (tmp_path / "qwen.json").write_text(json.dumps({"num_hidden_layers": 24}))
    done = edgellm("build", tmp_path / "hf", "-o", tmp_path / "out",
                   "--model_config", tmp_path / "qwen.json")
    assert done.returncode == 1, done.stderr
    assert "(24 layers) calls for tensors the source lacks: model.layers.10." in done.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "qwen.json").write_text(json.dumps({"model_type": "llama"}))
    done = edgellm("build", tmp_path / "hf", "-o", tmp_path / "out",
                   "--model_config", tmp_path / "qwen.json")
    assert done.returncode == 1 and "model_type 'llama' does not match" in done.stderr


def test_vendor_config_overrides_and_round_trips(tmp_path):
    """inspect --vendor-config prints the vendor JSON; fed back as --model-config it rebuilds
    the same config; an overriding field (here rope theta) lands in the artifact."""
    make_tiny_model(tmp_path / "hf", "qwen2", tied=True)
    assert edgellm("build", tmp_path / "hf", "-o", tmp_path / "a").returncode == 0
    shown = edgellm("inspect", tmp_path / "a", "--vendor-config")
    vendor = json.loads(shown.stdout)
    assert vendor["model_type"] == "qwen" and vendor["num_hidden_layers"] == 2
    assert vendor["max_position_embedings"] == 256 and vendor["norm_type"] == "rms_norm"
    vendor["rope_theta_base"] = 1e6
    (tmp_path / "v.json").write_text(json.dumps(vendor))
    done = edgellm("build", tmp_path / "hf", "-o", tmp_path / "b", "--model_config",
                   tmp_path / "v.json")
    assert done.returncode == 0, done.stderr
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text())["config"] for d in "ab")
    assert b["rope_theta"] == 1e6 and {**a, "rope_theta": 1e6} == b


def test_phi3_sliding_window_is_honoured_or_refused(tmp_path):
    make_tiny_model(tmp_path / "hf", "phi3", tied=False, sliding_window=64)
    done = edgellm("build", tmp_path / "hf", "-o", tmp_path / "long", "--kv-cache-len", "96")
    assert done.returncode == 1
    assert "exceeds this model's attention window of 64 positions" in done.stderr
    assert not (tmp_path / "long").exists()
    # a cache no longer than the window: every position sees all of its past, as in the window
    done = edgellm("build", tmp_path / "hf", "-o", tmp_path / "ok", "--kv-cache-len", "64")
    assert done.returncode == 0, done.stderr


def test_a_model_too_large_for_the_machine_is_refused_with_the_numbers(tmp_path, monkeypatch):
    from edgellm.compiler import memory
    from edgellm.compiler import BuildOptions, build
    from edgellm.errors import EdgeLLMError

    make_tiny_model(tmp_path / "hf", "qwen2", tied=False)
    monkeypatch.setattr(memory, "machine_memory", lambda: (100 * 2**20, 50 * 2**20))
    with pytest.raises(EdgeLLMError, match=r"needs about 0\.2 GB of RAM to run as s8 .* "
                                           r"this machine has 0\.1 GB"):
        build(tmp_path / "hf", tmp_path / "out", BuildOptions())
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(memory, "machine_memory", lambda: (100 * 2**30, 100 * 2**20))
    with pytest.raises(EdgeLLMError, match=r"building this model takes about 0\.3 GB"):
        build(tmp_path / "hf", tmp_path / "out", BuildOptions())
    assert build(tmp_path / "hf", tmp_path / "out", BuildOptions(memory_check=False)).is_dir()


def test_check_level_2_without_room_for_the_float_reference_still_builds(tmp_path, monkeypatch,
                                                                          capsys):
    """The fp32 copy `--check-level 2` compares with may not fit where the artifact does: the
    build succeeds and says the comparison was skipped, with the reason; the artifact is loaded
    once for the prompt and both evaluations."""
    from edgellm.arch import get_arch
    from edgellm.compiler import memory
    from edgellm.compiler import BuildOptions, build
    from edgellm.quant.schemes import get_scheme
    from edgellm.runtime.generator import Generator

    loads = []
    load = Generator.load.__func__
    monkeypatch.setattr(Generator, "load",
                        classmethod(lambda cls, *a, **k: loads.append(a) or load(cls, *a, **k)))

    make_tiny_model(tmp_path / "hf", "qwen2", tied=False)
    cfg = get_arch("qwen2").config_from_hf(json.loads((tmp_path / "hf/config.json").read_text()))
    s8, fp32 = get_scheme("s8"), get_scheme("fp32")
    room = (memory.footprint(cfg, s8, s8, 64).runtime
            + memory.footprint(cfg, fp32, fp32, 64).runtime) // 2
    monkeypatch.setattr(memory, "machine_memory", lambda: (room, 100 * 2**30))
    out = build(tmp_path / "hf", tmp_path / "out", BuildOptions(kv_cache_len=64, check_level=2))
    assert out.is_dir()
    err = capsys.readouterr().err
    assert ("no comparison with the unquantized source, whose fp32 copy does not fit: this model "
            "needs about") in err, err
    assert re.search(r"check quality on a short text: perplexity [\d.]+ over \d+ tokens", err)
    assert "top-1 agreement" not in err
    assert len(loads) == 1, loads


def test_the_seed_models_fit_this_machine():
    """The estimate for the largest seed model, Llama-3-8B as s8 (configs from its config.json)."""
    from edgellm.arch import get_arch
    from edgellm.compiler.memory import footprint
    from edgellm.quant.schemes import get_scheme

    cfg = get_arch("llama").config_from_hf(dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0))
    need = footprint(cfg, get_scheme("s8"), get_scheme("s8"), 1023)
    assert 7.5e9 < need.layer_weights + need.post_weights < 8.7e9  # 8.03B params at ~1.03 B each


@pytest.mark.parametrize("weight_type,group,asym", [("s8", 128, False), ("s4", 32, False),
                                                    ("s4", 64, True), ("bf16", 128, False)])
def test_the_footprint_matches_what_a_build_writes_and_the_engine_allocates(tmp_path, weight_type,
                                                                           group, asym):
    from edgellm.artifact.reader import load_artifact
    from edgellm.compiler import BuildOptions, build
    from edgellm.compiler.memory import footprint
    from edgellm.quant.schemes import get_scheme
    from edgellm.runtime.ort_engine import OrtEngine

    make_tiny_model(tmp_path / "hf", "qwen2", tied=False)
    art = load_artifact(build(tmp_path / "hf", tmp_path / "a", BuildOptions(
        kv_cache_len=100, weight_type=weight_type, post_weight_type=weight_type, group_size=group,
        asymmetric=asym)))
    scheme = get_scheme(weight_type, group, not asym)
    need = footprint(art.config, scheme, scheme, 100)
    if art.manifest.graphs:
        engine = OrtEngine(art, threads=1)
        assert need.kv_cache == engine.k_np.nbytes + engine.v_np.nbytes
    written = sum(art.manifest.files[f]["size"] for f in [*art.manifest.layers, art.manifest.post])
    tensors = sum(len(art.manifest.files[f]["tensors"])
                  for f in [*art.manifest.layers, art.manifest.post])
    # exact but for the alignment padding between tensors (under 64 bytes each)
    assert written - 64 * tensors < need.layer_weights + need.post_weights <= written


def test_rope_freq_factors_must_cover_every_rotary_frequency():
    """A GGUF's rope_freqs tensor becomes `freq_factors` scaling: one divisor per frequency."""
    import dataclasses

    import numpy as np

    from edgellm.arch.rope import inv_freq

    cfg = get_arch("llama").config_from_hf(dict(TINY, model_type="llama"))
    half = cfg.head_dim // 2
    factors = [1.0] * (half - 1) + [4.0]
    scaled = dataclasses.replace(cfg, rope_scaling={"rope_type": "freq_factors",
                                                    "factors": factors})
    plain = inv_freq(cfg, 64)[0]
    np.testing.assert_allclose(inv_freq(scaled, 64)[0], plain / np.asarray(factors))
    with pytest.raises(EdgeLLMError, match=rf"rope factors has {half - 1} entries, expected "
                                           rf"rotary_dim / 2 = {half}"):
        dataclasses.replace(cfg, rope_scaling={"rope_type": "freq_factors",
                                               "factors": factors[1:]})
