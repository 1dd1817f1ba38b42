"""Bad input: a one-line error naming the problem, exit code != 0, no traceback, nothing left."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import edgellm, make_tiny_model


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "hf"
    make_tiny_model(path, "qwen2", tied=False)
    return path


@pytest.fixture(scope="module")
def tiny_artifact(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny-s8"
    done = edgellm("build", tiny_hf, "-o", out, "--kv-cache-len", "24", "--prefill-len", "8")
    assert done.returncode == 0, done.stderr
    return out


def _fails_cleanly(done, *words):
    assert done.returncode != 0
    err = done.stderr.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # progress lines may come first
    assert last.startswith("edgellm: error: "), err
    assert err.count("edgellm: error:") == 1, err
    for w in words:
        assert w in last, err


def _no_leftovers(parent):
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".") and "tmp" in p.name]


def test_missing_config_json(tiny_hf, tmp_path):
    src = tmp_path / "noconfig"
    shutil.copytree(tiny_hf, src)
    (src / "config.json").unlink()
    _fails_cleanly(edgellm("build", src, "-o", tmp_path / "out"), "config.json")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture(tiny_hf, tmp_path):
    src = tmp_path / "gptneox"
    shutil.copytree(tiny_hf, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt_neox"}))
    _fails_cleanly(edgellm("build", src, "-o", tmp_path / "out"), "gpt_neox", "qwen2", "llama")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tiny_hf, tmp_path):
    src = tmp_path / "cut"
    shutil.copytree(tiny_hf, src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    _fails_cleanly(edgellm("build", src, "-o", tmp_path / "out"), "truncated", "model.safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_truncated_gguf(smol_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smol_gguf, "rb") as f:
        cut.write_bytes(f.read(20_000_000))
    _fails_cleanly(edgellm("build", cut, "-o", tmp_path / "out"), "truncated", "cut.gguf")
    assert not (tmp_path / "out").exists()


def test_missing_input_path(tmp_path):
    _fails_cleanly(edgellm("build", tmp_path / "nope", "-o", tmp_path / "out"), "does not exist")


def _edit_weights(tiny_hf, dest, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_hf, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors")
    return dest


def test_unmapped_tensor_is_named(tiny_hf, tmp_path):
    src = _edit_weights(tiny_hf, tmp_path / "extra", lambda t: t.update(
        {"model.layers.0.mlp.surprise.weight": t["model.norm.weight"].clone()}))
    _fails_cleanly(edgellm("build", src, "-o", tmp_path / "out"), "model.layers.0.mlp.surprise")
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_failure_mid_build_leaves_nothing(tiny_hf, tmp_path):
    """Layer 0 is written before layer 1's bad shape is met: the temporary directory goes."""
    name = "model.layers.1.mlp.down_proj.weight"
    src = _edit_weights(tiny_hf, tmp_path / "bad", lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    _fails_cleanly(edgellm("build", src, "-o", tmp_path / "out"), name, "shape")
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_existing_output_refused_unless_force(tiny_hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails_cleanly(edgellm("build", tiny_hf, "-o", out), "exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    done = edgellm("build", tiny_hf, "-o", out, "--force", "--kv-cache-len", "32")
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.json").is_file() and not (out / "keep.txt").exists()
    _no_leftovers(tmp_path)


def test_unknown_manifest_version(tiny_artifact, tmp_path):
    art = tmp_path / "future"
    shutil.copytree(tiny_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps(manifest | {"format_version": 99}))
    _fails_cleanly(edgellm("run", art, "-p", "hi"), "version 99", "supports 2")


def test_not_an_artifact(tmp_path):
    _fails_cleanly(edgellm("run", tmp_path, "-p", "hi"), "manifest.json")


def test_truncated_artifact_file(tiny_artifact, tmp_path):
    art = tmp_path / "cut"
    shutil.copytree(tiny_artifact, art)
    layer = art / "layer_001.bin"
    layer.write_bytes(layer.read_bytes()[:100])
    _fails_cleanly(edgellm("inspect", art), "layer_001.bin", "bytes")


def test_verify_catches_a_changed_byte(tiny_artifact, tmp_path):
    """Every load checks sizes and a sample of pages (all of a small file); --verify every
    byte."""
    art = tmp_path / "flip"
    shutil.copytree(tiny_artifact, art)
    data = bytearray((art / "post.bin").read_bytes())
    data[200] ^= 0xFF
    (art / "post.bin").write_bytes(bytes(data))
    _fails_cleanly(edgellm("inspect", art), "post.bin", "sha256")  # small: sampled whole
    shutil.copy(tiny_artifact / "post.bin", art / "post.bin")
    embed = art / "model.embed_tokens.weight.bfloat16.bin"
    data = bytearray(embed.read_bytes())
    assert len(data) > 8 * 4096
    data[4096 + 100] ^= 0xFF  # between the first two sampled pages
    embed.write_bytes(bytes(data))
    assert edgellm("inspect", art).returncode == 0
    _fails_cleanly(edgellm("inspect", art, "--verify"), "bfloat16.bin", "sha256")


def test_prompt_longer_than_kv_cache(tiny_artifact):
    _fails_cleanly(edgellm("run", tiny_artifact, "-p", "hello world " * 40),
                   "KV cache holds 24", "--ctx-size", "no rebuild")
    # the advice works: the same prompt at a longer context, the artifact unchanged
    done = edgellm("run", tiny_artifact, "-p", "hello world " * 40, "--ctx-size", "256",
                   "--max-new-tokens", "4", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["prompt_tokens"] > 24


@pytest.mark.parametrize("size,words", [("0", ("at least 1",)),
                                        ("257", ("257", "256 positions", "trained"))])
def test_ctx_size_out_of_range(tiny_artifact, size, words):
    _fails_cleanly(edgellm("run", tiny_artifact, "-p", "hi", "--ctx-size", size), *words)
    _fails_cleanly(edgellm("plan", tiny_artifact, "--ram", "1GB", "--bandwidth", "1GB",
                           "--ctx-size", size), *words)


def test_bad_sampling_flag(tiny_artifact):
    _fails_cleanly(edgellm("run", tiny_artifact, "-p", "hi", "--top-p", "0"), "top-p")


def test_unknown_model_name():
    _fails_cleanly(edgellm("pull", "no-such-model"), "no-such-model", "qwen2.5-coder-0.5b")
