"""`edgellm eval` (perplexity, agreement with the unquantized source) and `edgellm plan`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.compiler import BuildOptions, build
from edgellm.compiler.check import evaluate_artifact
from edgellm.eval import SHORT_TEXT, _windows
from helpers import edgellm, make_tiny_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    model = make_tiny_model(tmp / "hf", "qwen2", tied=False, scale=3.0, embed_boost=20.0)
    return tmp, model


@pytest.mark.parametrize("n,context,stride", [(10, 4, 2), (50, 16, 5), (3, 8, 4), (40, 40, 1)])
def test_sliding_windows_score_every_token_once_with_bounded_context(n, context, stride):
    scored = []
    for start, end, row in _windows(n, context, stride):
        assert end - start <= context and 0 <= row < end - start - 1
        scored += range(start + row + 1, end)
    assert scored == list(range(1, n))


def test_perplexity_equals_transformers_when_the_window_holds_the_text(tiny):
    tmp, model = tiny
    art = build(tmp / "hf", tmp / "fp32", BuildOptions(kv_cache_len=256, weight_type="bf16",
                                                       hidden_state_type="fp32"))
    quality = evaluate_artifact(art, SHORT_TEXT, max_tokens=200, engine="numpy")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tmp / "hf" / "tokenizer.json")).encode(
        SHORT_TEXT, add_special_tokens=False).ids[:200]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nll = -torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), ids[1:]]
    assert quality.tokens == len(ids) - 1 and quality.context == 256
    assert quality.perplexity == pytest.approx(float(torch.exp(nll.mean())), rel=1e-4)


def test_reference_comparison_is_exact_for_float_weights_and_sees_int4(tiny):
    tmp, _ = tiny
    art = build(tmp / "hf", tmp / "float", BuildOptions(kv_cache_len=64, weight_type="fp32",
                                                        hidden_state_type="fp32"))
    same = evaluate_artifact(art, SHORT_TEXT, reference_source=tmp / "hf", engine="numpy")
    assert same.top1_agreement == 1.0 and same.mean_kl < 1e-9
    assert same.perplexity == pytest.approx(same.reference_perplexity, rel=1e-6)
    art = build(tmp / "hf", tmp / "s4", BuildOptions(kv_cache_len=64, weight_type="s4",
                                                     group_size=32))
    s4 = evaluate_artifact(art, SHORT_TEXT, reference_source=tmp / "hf")
    assert s4.mean_kl > 1e-4 and s4.top1_agreement < 1.0  # the int4 error is seen...
    assert s4.reference_perplexity == pytest.approx(same.reference_perplexity, rel=1e-6)
    assert s4.context == 64 and s4.stride == 32


def test_eval_and_plan_on_the_command_line(tiny, tmp_path):
    tmp, _ = tiny
    art = build(tmp / "hf", tmp / "cli", BuildOptions(kv_cache_len=64))
    (tmp_path / "text.txt").write_text(SHORT_TEXT)
    done = edgellm("eval", art, "--perplexity", tmp_path / "text.txt", "--context", "32",
                   "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["context"] == 32 and result["stride"] == 16 and result["perplexity"] > 1
    done = edgellm("eval", art, "--perplexity", tmp_path / "missing.txt")
    assert done.returncode == 1 and "missing.txt" in done.stderr

    done = edgellm("plan", art, "--ram", "2GB", "--bandwidth", "17GB/s", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["weights"]: r for r in json.loads(done.stdout)["rows"]}
    assert rows["s8"]["fits"] and rows["s4 g128"]["weights_gb"] < rows["s8"]["weights_gb"]
    assert rows["s8"]["decode_ceiling_tok_s"] == pytest.approx(17e9 / (rows["s8"]["weights_gb"]
                                                                       * 1e9))
    done = edgellm("plan", art, "--board", "rpi5")
    assert done.returncode == 0 and "| s4 g32 |" in done.stdout and "17.1 GB/s" in done.stdout
    done = edgellm("plan", art, "--ram", "lots", "--bandwidth", "1GB/s")
    assert done.returncode == 1 and "not a size" in done.stderr


def test_plan_says_no_when_the_device_is_too_small(tiny):
    from edgellm.arch import get_arch
    from edgellm.plan import parse_size, plan

    cfg = get_arch("qwen2").config_from_hf(dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936))
    rows = {r["weights"]: r for r in plan(cfg, 1023, parse_size("1GB", "ram"), 8e9)}
    assert not rows["s8"]["fits"] and rows["s4 g128"]["fits"] is False  # 1.5B: ~1.0 GB at s4
    assert np.isclose(rows["s8"]["weights_gb"], 1.6, atol=0.05)  # measured artifact: 1.59 GB
