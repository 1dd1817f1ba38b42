"""GPTQ (`build --quant-method gptq`): the algorithm against round to nearest, and a build."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.compiler import BuildOptions, build
from edgellm.compiler.calibration import calibration_text
from edgellm.errors import EdgeLLMError
from edgellm.compiler.check import evaluate_artifact
from edgellm.quant.gptq import Gram, _inverse_cholesky, gptq_quantize
from edgellm.quant.schemes import get_scheme
from helpers import edgellm, make_tiny_model

SCHEMES = [("s4", 32, True), ("s4", 32, False), ("s4", 64, True), ("s8", 32, True)]


def _gram(x: np.ndarray) -> Gram:
    gram = Gram(x.shape[1])
    gram.add(x)
    return gram


def _correlated_inputs(rng, n: int, width: int) -> np.ndarray:
    """Inputs whose channels are mixed, with a few large ones, as a layer's inputs are."""
    mixing = rng.standard_normal((width, width)) / np.sqrt(width)
    x = rng.standard_normal((n, width)) @ (0.5 * np.eye(width) + mixing)
    x[:, rng.choice(width, 4, replace=False)] *= 6
    return x.astype(np.float32)


@pytest.mark.parametrize("weight_type,group,symmetric", SCHEMES)
def test_uncorrelated_inputs_give_round_to_nearest_exactly(weight_type, group, symmetric):
    """With H diagonal no error has anywhere to go: GPTQ must store RTN's very bytes."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 100)).astype(np.float32)  # 100: a partial last group
    gram = Gram(100)
    gram.matrix[np.diag_indices(100)] = rng.uniform(0.5, 2.0, 100)
    gram.rows = 1
    scheme = get_scheme(weight_type, group, symmetric)
    gptq, rtn = gptq_quantize(w, gram, scheme), scheme.quantize(w)
    assert gptq.keys() == rtn.keys()
    for part in rtn:
        np.testing.assert_array_equal(gptq[part], rtn[part], err_msg=part)


@pytest.mark.parametrize("weight_type,group,symmetric", SCHEMES)
def test_gptq_lowers_the_output_error_on_inputs_like_the_calibration(weight_type, group,
                                                                      symmetric):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 160)) * 0.05).astype(np.float32)
    x = _correlated_inputs(rng, 8000, 160)
    seen, held_out = x[:4000], x[4000:]
    scheme = get_scheme(weight_type, group, symmetric)
    gptq = scheme.dequantize(gptq_quantize(w, _gram(seen), scheme), 160)
    rtn = scheme.dequantize(scheme.quantize(w), 160)

    def error(wq, inputs):
        return np.linalg.norm(inputs @ (w - wq).T) / np.linalg.norm(inputs @ w.T)

    assert error(gptq, seen) < 0.8 * error(rtn, seen)
    assert error(gptq, held_out) < 0.85 * error(rtn, held_out)


def test_rows_done_in_chunks_give_the_same_bytes():
    """The lm_head goes `rows` output rows at a time, each chunk encoded as it comes."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((45, 96)).astype(np.float32)
    gram = _gram(_correlated_inputs(rng, 500, 96))
    for symmetric in (True, False):
        scheme = get_scheme("s4", 32, symmetric)
        whole, chunked = gptq_quantize(w, gram, scheme), gptq_quantize(w, gram, scheme, rows=8)
        assert whole.keys() == chunked.keys()
        for part in whole:
            np.testing.assert_array_equal(chunked[part], whole[part], err_msg=part)


def test_inverse_cholesky_factor():
    x = _correlated_inputs(np.random.default_rng(3), 600, 300)  # 300 > 256: the halving path
    gram = _gram(x)
    u = _inverse_cholesky(gram, damp=0.1)
    h = gram.matrix / gram.rows
    h[np.diag_indices(300)] += 0.1 * np.mean(np.diag(h))
    assert np.allclose(np.tril(u, -1), 0)
    np.testing.assert_allclose(u.T @ u @ h, np.eye(300), atol=1e-8)


def test_inputs_never_seen_get_zero_weights():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    x = rng.standard_normal((500, 64)).astype(np.float32)
    x[:, 5] = 0
    scheme = get_scheme("s8", 32, True)
    wq = scheme.dequantize(gptq_quantize(w, _gram(x), scheme), 64)
    assert np.all(wq[:, 5] == 0) and np.all(wq[:, 4] != 0)


def test_the_built_in_calibration_text_is_installed():
    text = calibration_text(None)
    assert "def " in text and "The river begins" in text  # the mixed text: prose and code
    assert "assert_stmt" in text  # the Python reference's topics
    assert len(text) > 140_000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("gptq")
    make_tiny_model(tmp / "hf", "qwen2", tied=False, scale=3.0, embed_boost=20.0)
    (tmp / "calibration.txt").write_text(calibration_text(None)[:20_000])
    return tmp


def test_gptq_build_is_closer_to_the_source_on_its_calibration_text(tiny):
    text = (tiny / "calibration.txt").read_text()
    common = dict(kv_cache_len=128, weight_type="s4", group_size=32)
    rtn = build(tiny / "hf", tiny / "rtn", BuildOptions(**common))
    gptq = build(tiny / "hf", tiny / "gptq", BuildOptions(
        **common, quant_method="gptq", calibration=str(tiny / "calibration.txt"),
        calibration_tokens=2000))
    manifest = json.loads((gptq / "manifest.json").read_text())
    assert manifest["quantization"] == {"method": "gptq", "calibration_tokens": 2000,
                                        "calibration_text": "calibration.txt"}
    assert json.loads((rtn / "manifest.json").read_text())["quantization"] == {"method": "rtn"}
    shown = edgellm("inspect", gptq)
    assert "GPTQ, 2000 calibration tokens of calibration.txt" in shown.stdout, shown.stderr

    def quality(art, engine):
        return evaluate_artifact(art, text, reference_source=tiny / "hf", max_tokens=256,
                                 engine=engine)

    ort, numpy_engine = quality(gptq, "ort"), quality(gptq, "numpy")
    rtn_kl = quality(rtn, "ort").mean_kl
    assert ort.mean_kl < 0.7 * rtn_kl
    assert ort.perplexity == pytest.approx(numpy_engine.perplexity, rel=0.02)


def test_gptq_options_are_checked_before_building(tiny, tmp_path):
    with pytest.raises(EdgeLLMError, match="integer weights"):
        BuildOptions(weight_type="bf16", quant_method="gptq")
    with pytest.raises(EdgeLLMError, match="only read by --quant-method gptq"):
        BuildOptions(calibration=str(tiny / "calibration.txt"))
    done = edgellm("build", tiny / "hf", "-o", tmp_path / "out", "--weight-type", "s4",
                   "--quant-method", "gptq", "--calibration", tmp_path / "missing.txt")
    assert done.returncode == 1 and "missing.txt is not a file" in done.stderr
    assert not (tmp_path / "out").exists()


def test_calibration_steps_reach_every_linear():
    from itertools import chain

    from edgellm.arch.spec import LAYER_LINEARS
    from edgellm.runtime.reference import LINEAR_INPUTS

    assert sorted(chain(*LINEAR_INPUTS.values())) == sorted(LAYER_LINEARS)


def test_gptq_calibration_counts_in_the_memory_check(tiny, tmp_path, monkeypatch):
    from edgellm.compiler import memory
    from edgellm.compiler.sources import open_source

    opts = dict(kv_cache_len=64, weight_type="s4", group_size=32)
    scheme = get_scheme("s4", 32, True)
    need = memory.footprint(open_source(tiny / "hf").config, scheme, scheme, 64).build_peak
    monkeypatch.setattr(memory, "machine_memory", lambda: (100 * 2**30, need + 2**20))
    with pytest.raises(EdgeLLMError, match="and GPTQ calibration.*fewer --calibration-tokens"):
        build(tiny / "hf", tmp_path / "gptq", BuildOptions(**opts, quant_method="gptq",
                                                          calibration_tokens=100_000))
    assert not (tmp_path / "gptq").exists()
    assert build(tiny / "hf", tmp_path / "rtn", BuildOptions(**opts)).is_dir()



def test_a_killed_build_leaves_nothing_behind(tiny, tmp_path):
    """SIGTERM during a (slow, GPTQ) build: no artifact and no temporary directory."""
    import signal
    import subprocess
    import sys
    import time

    build_cmd = [sys.executable, "-m", "edgellm.cli", "build", tiny / "hf", "-o",
                 tmp_path / "out", "--weight-type", "s4", "--quant-method", "gptq"]
    proc = subprocess.Popen(build_cmd, stderr=subprocess.PIPE, text=True)
    while not any(tmp_path.iterdir()) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert list(tmp_path.iterdir()) == []
