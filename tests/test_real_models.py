"""Golden greedy decoding on real weights, against a float32 transformers reference.

The GGUF weights are already 4-5 bit; the reference dequantizes them to float32, and the artifact
re-quantizes the same values to int8 (group 128) with a bf16 hidden state, so the int8 error seen
here is smaller than it would be against the original bf16 checkpoints.
"""

from __future__ import annotations

import pytest

from edgellm.runtime.generator import Generator
from edgellm.runtime.sampler import SamplingConfig

pytestmark = pytest.mark.slow

GOLDEN_PROMPT = "Write a Python function that returns the n-th Fibonacci number."
N_TOKENS = 32


def _reference_tokens(gguf_path, prompt_ids: list[int]) -> list[int]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
        quantization_config=transformers.GgufConfig(dequantize=True))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=N_TOKENS, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def reference_cache():
    return {}


# SmolLM2 on the ORT engine is left out: its first greedy token is a near tie (logits 34.47 vs
# 34.06 in float32) and the int8 activations inside MatMulNBits (accuracy_level 4) move its
# logits by up to 5% of the largest, which flips it; see docs/PERFORMANCE.md and the test below.
@pytest.mark.parametrize("gguf,artifact,engine", [("qwen_gguf", "qwen_s8", "numpy"),
                                                  ("qwen_gguf", "qwen_s8", "ort"),
                                                  ("qwen15_gguf", "qwen15_s8", "ort"),
                                                  ("smol_gguf", "smol_s8", "numpy")])
def test_greedy_tokens_equal_float32_reference(gguf, artifact, engine, request, reference_cache):
    gen = Generator.load(request.getfixturevalue(artifact), engine=engine)
    ids = gen.encode_chat([{"role": "user", "content": GOLDEN_PROMPT}])
    ours = gen.generate(ids, SamplingConfig(), max_new_tokens=N_TOKENS).token_ids
    if gguf not in reference_cache:
        reference_cache[gguf] = _reference_tokens(request.getfixturevalue(gguf), ids)
    reference = reference_cache[gguf]
    reference = [t for t in reference if t not in gen.eos_ids]
    assert len(ours) == len(reference) == N_TOKENS
    assert ours == reference


@pytest.mark.parametrize("engine", ["numpy", "ort"])
@pytest.mark.parametrize("artifact", ["qwen_s8", "smol_s8"])
def test_capital_of_france_is_paris(artifact, engine, request):
    gen = Generator.load(request.getfixturevalue(artifact), engine=engine)
    ids = gen.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    result = gen.generate(ids, SamplingConfig(), max_new_tokens=40)
    assert "Paris" in result.text
    assert result.stop_reason == "eos"


def test_qwen2_1_5b_shapes_and_answer(qwen15_s8):
    """Qwen2.5-Coder-1.5B: head_dim 128, 12 query heads over 2 kv heads, untied lm_head."""
    gen = Generator.load(qwen15_s8, engine="ort")
    cfg = gen.artifact.config
    assert (cfg.num_layers, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads) == (28, 128, 12, 2)
    assert not cfg.tie_word_embeddings
    ids = gen.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    result = gen.generate(ids, SamplingConfig(), max_new_tokens=40)
    assert "Paris" in result.text and result.stop_reason == "eos"


def test_smollm2_ort_logits_stay_close_to_the_reference_engine(smol_s8):
    import numpy as np

    engines = {e: Generator.load(smol_s8, engine=e) for e in ("numpy", "ort")}
    ids = engines["numpy"].encode_chat([{"role": "user", "content": GOLDEN_PROMPT}])
    ref, ours = (engines[e].engine.forward(ids, 0) for e in ("numpy", "ort"))
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 0.06  # measured 4.9%
    assert ours.argmax() in np.argsort(-ref)[:2]
