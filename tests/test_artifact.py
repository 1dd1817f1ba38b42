"""Quantization references, the bf16 embedding file and the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.dtypes import bf16_bits_to_fp32, fp32_to_bf16_bits
from edgellm.quant.schemes import get_scheme


@pytest.mark.parametrize("name,bound", [("s8", 0.5 / 127), ("s4", 1 / 8)])
@pytest.mark.parametrize("in_features", [128, 200, 77])
def test_groupwise_roundtrip_error_is_half_a_step(name, bound, in_features):
    """Every weight the grid covers is within half a step; s8's grid covers the group
    (max|w| / 127 steps), s4's runs from the largest magnitude m, exact at -8 steps (m / -8), to 7
    steps, so weights of m's opposite sign beyond 7/8 of |m| clip to the end of the grid."""
    scheme = get_scheme(name)
    w = np.random.default_rng(0).normal(size=(33, in_features)).astype(np.float32)
    parts = scheme.quantize(w)
    groups = -(-in_features // 128)
    assert parts["qweight"].shape == (33, groups, 128 * scheme.bits // 8)
    assert parts["qweight"].dtype == np.uint8 and parts["scales"].shape == (33, groups)
    w_hat = scheme.dequantize(parts, in_features)
    assert w_hat.shape == w.shape
    padded = np.zeros((33, groups * 128), np.float32)
    padded[:, :in_features] = w
    blocks = padded.reshape(33, groups, 128)
    scale = parts["scales"][..., None]
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    expected = largest / -8 if name == "s4" else np.abs(largest) / 127
    np.testing.assert_allclose(scale, expected, rtol=1e-6)
    steps = blocks / scale
    beyond = np.abs(steps - np.clip(steps, -scheme.qmax - 1, scheme.qmax)) * np.abs(scale)
    err = np.abs(padded - np.pad(w_hat, ((0, 0), (0, groups * 128 - in_features))))
    assert (err.reshape(33, groups, 128) <= np.abs(scale) * 0.5 + beyond + 1e-7).all()
    if name == "s4":
        assert (beyond > 0).any()  # the clipping side is exercised
        np.testing.assert_array_equal(  # the largest magnitude is exact
            np.take_along_axis(np.pad(w_hat, ((0, 0), (0, groups * 128 - in_features)))
                               .reshape(33, groups, 128), np.abs(blocks).argmax(-1)[..., None],
                               -1), largest)
    assert np.abs(w - w_hat).max() / np.abs(w).max() <= bound + 1e-6


def test_s8_layout_is_offset_binary_like_matmulnbits():
    w = np.zeros((1, 128), np.float32)
    w[0, 0], w[0, 1] = 1.0, -1.0
    parts = get_scheme("s8").quantize(w)
    assert parts["qweight"][0, 0, :3].tolist() == [255, 1, 128]  # 127+128, -127+128, 0+128
    assert parts["scales"][0, 0] == pytest.approx(1 / 127)


def test_s4_packs_low_nibble_first():
    w = np.zeros((1, 128), np.float32)
    w[0, 0], w[0, 1] = -8.0, 7.0  # the largest magnitude, -8, sets the scale: -8 / -8 = 1
    parts = get_scheme("s4").quantize(w)
    byte = parts["qweight"][0, 0, 0]
    assert byte & 0x0F == 0 and byte >> 4 == 15  # -8+8 low, 7+8 high
    assert parts["scales"][0, 0] == 1.0


def test_s4_scale_is_negative_when_the_largest_weight_is_positive():
    w = np.zeros((1, 32), np.float32)
    w[0, :3] = 4.0, -3.5, 1.0  # scale 4 / -8 = -0.5: 4 -> -8 steps, -3.5 -> 7, 1 -> -2
    scheme = get_scheme("s4", 32)
    parts = scheme.quantize(w)
    assert parts["scales"][0, 0] == -0.5
    assert (parts["qweight"][0, 0, 0], parts["qweight"][0, 0, 1] & 0x0F) == (0 | 15 << 4, 6)
    np.testing.assert_array_equal(scheme.dequantize(parts, 32), w)


def test_bf16_rounds_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, 1.0 + 2**-8 + 2**-20, -2.5, np.inf],
                 dtype=np.float32)
    # 1+2^-8 is a tie -> even (1.0); 1+3*2^-8 tie -> even (1+2^-6); just above a tie rounds up
    expected = np.array([1.0, 1.0, 1.015625, 1.0078125, -2.5, np.inf], dtype=np.float32)
    np.testing.assert_array_equal(bf16_bits_to_fp32(fp32_to_bf16_bits(x)), expected)


@pytest.mark.slow
def test_qwen_embedding_file_is_vendor_sized_and_exact(qwen_s8, qwen_gguf):
    import gguf

    emb = qwen_s8 / "model.embed_tokens.weight.bfloat16.bin"
    assert emb.stat().st_size == 151936 * 896 * 2 == 272_269_312
    table = np.fromfile(emb, dtype=np.uint16).reshape(151936, 896)
    t = next(t for t in gguf.GGUFReader(qwen_gguf).tensors if t.name == "token_embd.weight")
    rows = gguf.quants.dequantize(t.data[1000:1010], t.tensor_type)
    np.testing.assert_array_equal(table[1000:1010], fp32_to_bf16_bits(rows))


@pytest.mark.slow
def test_manifest_records_what_the_runtime_needs(qwen_s8):
    m = json.loads((qwen_s8 / "manifest.json").read_text())
    assert list(m)[0] == "format_version"
    assert m["weight_scheme"] == {"name": "s8", "bits": 8, "group_size": 128, "kind": "int",
                                  "symmetric": True, "zero_point": 128, "scale_dtype": "fp32",
                                  "layout": "MatMulNBits"}
    assert m["config"]["arch"] == "qwen2" and m["config"]["num_layers"] == 24
    assert m["config"]["tie_word_embeddings"] is False  # this GGUF stores lm_head apart
    assert 151645 in m["tokenizer"]["eos_ids"] and 151643 in m["tokenizer"]["eos_ids"]
    assert m["tokenizer"]["chat_template"].startswith("{%- if tools %}")
    assert len(m["layers"]) == 24 and all(f in m["files"] for f in m["layers"])
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())


def test_a_version_2_manifest_still_loads(tmp_path):
    """v3 added config fields and layer_schemes, all with defaults: a v2 artifact keeps working."""
    import json

    from edgellm.artifact.reader import load_artifact
    from edgellm.compiler import BuildOptions, build
    from helpers import make_tiny_model

    make_tiny_model(tmp_path / "hf", "llama", tied=True)
    art = build(tmp_path / "hf", tmp_path / "a", BuildOptions(kv_cache_len=32))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["format_version"] = 2
    del manifest["layer_schemes"]
    for key in ("rotary_dim", "embed_scale", "residual_scale", "logit_scale", "sliding_window"):
        del manifest["config"][key]
    (art / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_artifact(art)
    assert loaded.config.embed_scale == 1.0 and loaded.manifest.layer_schemes == {}
