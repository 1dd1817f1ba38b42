"""The context length at run time (--ctx-size): an artifact built for one KV cache length runs
at another with the same logits as one built for that length, on both engines and both 8-bit
paths; limits and memory are checked with a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.artifact.reader import load_artifact
from edgellm.compiler import BuildOptions, build
from edgellm.errors import EdgeLLMError
from edgellm.runtime.context import context_length
from edgellm.runtime.engine import NumpyEngine
from edgellm.runtime.ort_engine import OrtEngine
import test_parity
from helpers import edgellm, make_tiny_model

SHORT, LONG = 24, 100  # the longrope case's original context is 32: the factors switch between

CASES = [("qwen2", False, {}), ("phi3", False, test_parity.PHI3_LONGROPE),
         ("gemma3", True, test_parity.GEMMA3), ("llama", True, test_parity.LLAMA3_ROPE)]


def _build(tmp, arch, tied, config):
    make_tiny_model(tmp / "hf", arch, tied, scale=3.0, embed_boost=20.0, **config)
    return {n: load_artifact(build(tmp / "hf", tmp / f"kv{n}", BuildOptions(
        kv_cache_len=n, prefill_len=16, weight_type="s8", post_weight_type="s8",
        hidden_state_type="bf16"))) for n in (SHORT, LONG)}


@pytest.fixture(scope="module", params=CASES, ids=[c[0] + ("-" + next(iter(c[2])) if c[2] else "")
                                                   for c in CASES])
def built(request, tmp_path_factory):
    return _build(tmp_path_factory.mktemp("ctx"), *request.param)


def _kv_bytes(cfg) -> int:
    """K and V, float32, of every layer for one position: the count the checks must use."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4


def _logits(engine, ids):
    rows = [engine.forward(ids[:40], 0, all_logits=True)]  # one chunk past the short context
    rows += [engine.forward([t], p)[None] for p, t in enumerate(ids[40:], start=40)]
    return np.concatenate(rows)


IDS = list(np.random.default_rng(5).integers(0, 300, 90))


@pytest.mark.parametrize("kernel", ["matmulnbits", "qgemm"])
def test_ort_at_another_context_is_the_build_for_it(built, kernel):
    resized = OrtEngine(built[SHORT], threads=1, kernel=kernel, context=LONG)
    assert resized.kv_cache_len == LONG and resized.k_np.shape[3] == LONG
    native = OrtEngine(built[LONG], threads=1, kernel=kernel)
    np.testing.assert_array_equal(_logits(resized, IDS), _logits(native, IDS))
    # and shorter than built: the first positions run as at the built length
    short = OrtEngine(built[LONG], threads=1, kernel=kernel, context=SHORT)
    np.testing.assert_array_equal(short.forward(IDS[:20], 0, all_logits=True),
                                  OrtEngine(built[SHORT], threads=1, kernel=kernel)
                                  .forward(IDS[:20], 0, all_logits=True))
    with pytest.raises(EdgeLLMError, match=f"exceed the KV cache of {SHORT}"):
        short.forward(IDS[:30], 0)


def test_numpy_at_another_context_is_the_build_for_it(built):
    resized, native = NumpyEngine(built[SHORT], context=LONG), NumpyEngine(built[LONG])
    np.testing.assert_array_equal(_logits(resized, IDS), _logits(native, IDS))


def test_the_longrope_factors_follow_the_context(tmp_path):
    """Not a no-op: past the original context the long factors rotate differently."""
    art = _build(tmp_path, *CASES[1])[SHORT]
    assert art.config.rope_scaling["rope_type"] == "longrope"
    at_short = OrtEngine(art, threads=1).forward(IDS[:20], 0, all_logits=True)
    at_long = OrtEngine(art, threads=1, context=LONG).forward(IDS[:20], 0, all_logits=True)
    assert np.abs(at_short - at_long).max() > 1e-3


def test_context_limits(built):
    art = built[SHORT]
    trained = art.config.max_position_embeddings
    assert context_length(art, None) == SHORT
    assert context_length(art, trained) == trained
    with pytest.raises(EdgeLLMError, match="trained for"):
        context_length(art, trained + 1)
    with pytest.raises(EdgeLLMError, match="at least 1"):
        context_length(art, 0)
    per = _kv_bytes(art.config)
    weights = sum(f["size"] for f in art.manifest.files.values())
    room = weights + 200 * per * 2  # two slots of 200 positions
    assert context_length(art, 200, slots=2, available=room) == 200
    with pytest.raises(EdgeLLMError) as e:
        context_length(art, 201, slots=2, available=room)
    assert "--ctx-size 200 or less" in str(e.value) and "GB of KV cache (2 slots)" in str(e.value)


def test_plan_counts_the_context(built):
    out = [json.loads(edgellm("plan", built[SHORT].path, "--ram", "4GB", "--bandwidth", "4GB/s",
                              "--ctx-size", str(n), "--json").stdout) for n in (SHORT, 200)]
    assert [o["kv_cache_len"] for o in out] == [SHORT, 200]
    grow = [b["kv_cache_gb"] - a["kv_cache_gb"] for a, b in zip(out[0]["rows"], out[1]["rows"])]
    want = (200 - SHORT) * _kv_bytes(built[SHORT].config) / 1e9
    assert grow and all(g == pytest.approx(want) for g in grow)


@pytest.fixture(scope="module")
def qwen_built(tmp_path_factory):
    """The qwen2 case alone, for the checks that need no other architecture."""
    return _build(tmp_path_factory.mktemp("ctx_qwen"), *CASES[0])


def test_serve_runs_a_hubs_context_by_default_where_memory_holds_it(qwen_built, monkeypatch,
                                                                     capsys):
    """A home hub's prompt of devices and tools runs to 3,000 tokens: `serve` without --ctx-size
    ran the artifact's 1,023 positions and answered the hub 400. It now runs SERVE_CONTEXT
    positions (at most the trained context; llama-server's default too), or, where memory does
    not hold that, the artifact's own, and says so."""
    from edgellm import machine
    from edgellm.server.serving import SERVE_CONTEXT, serve_context
    from helpers import serve_process

    art = qwen_built[SHORT]
    wanted = min(SERVE_CONTEXT, art.config.max_position_embeddings)
    assert wanted > SHORT and serve_context(art) == wanted
    proc, banner = serve_process(art.path, "--port", "0", "--threads", "1")
    proc.terminate()
    proc.wait(timeout=60)
    assert any(f"{wanted}-position KV cache" in line for line in banner), banner
    proc, banner = serve_process(art.path, "--port", "0", "--threads", "1", "--ctx-size", "50")
    proc.terminate()
    proc.wait(timeout=60)
    assert any("50-position KV cache" in line for line in banner), banner

    weights = sum(f["size"] for f in art.manifest.files.values())
    monkeypatch.setattr(machine, "machine_memory",
                        lambda: (weights * 4, weights + 30 * _kv_bytes(art.config)))
    assert serve_context(art) is None
    said = capsys.readouterr().err
    assert f"serving the artifact's {SHORT}-position context, not {wanted}" in said
    assert "--ctx-size 30 or less" in said
