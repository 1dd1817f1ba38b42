"""Golden greedy decoding on real weights, against a float32 transformers reference.

The GGUF weights are already 4-5 bit; the reference dequantizes them to float32, and the artifact
re-quantizes the same values to int8 (group 128) with a bf16 hidden state, so the int8 error seen
here is smaller than it would be against the original bf16 checkpoints.
"""

from __future__ import annotations

import json
import math

import numpy as np
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
    # MatMulNBits, the path these ids were verified on (--kernel auto may pick the integer GEMM
    # on another host: test_qgemm_path_follows_the_reference_to_its_first_near_tie)
    gen = Generator.load(request.getfixturevalue(artifact), engine=engine, kernel="matmulnbits")
    ids = gen.encode_chat([{"role": "user", "content": GOLDEN_PROMPT}])
    ours = gen.generate(ids, SamplingConfig(), max_new_tokens=N_TOKENS).token_ids
    if gguf not in reference_cache:
        reference_cache[gguf] = _reference_tokens(request.getfixturevalue(gguf), ids)
    reference = reference_cache[gguf]
    reference = [t for t in reference if t not in gen.eos_ids]
    assert len(ours) == len(reference) == N_TOKENS
    assert ours == reference


def test_qgemm_path_follows_the_reference_to_its_first_near_tie(qwen_s8):
    """The 8-bit weights on the integer GEMM (edgellm.onnx.qgemm; what --kernel auto runs where
    it measures faster) rounds more coarsely than MatMulNBits (per output channel, one scale per
    activation row): its greedy tokens equal the numpy reference's up to the first step whose
    top two reference logits lie within 2% of the largest (measured: step 26, 0.22 of 19.8)."""
    ref = Generator.load(qwen_s8, engine="numpy")
    ids = ref.encode_chat([{"role": "user", "content": GOLDEN_PROMPT}])
    want = ref.generate(ids, SamplingConfig(), max_new_tokens=N_TOKENS).token_ids
    logits = ref.engine.forward(ids + want, 0, all_logits=True)[len(ids) - 1:]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    ties = np.nonzero(top2[:, 1] - top2[:, 0] < 0.02 * np.abs(top2[:, 1]))[0]
    first_tie = int(ties[0]) if len(ties) else len(want)
    assert first_tie >= 8  # enough tokens for the comparison to mean something
    gen = Generator.load(qwen_s8, kernel="qgemm")
    ours = gen.generate(ids, SamplingConfig(), max_new_tokens=N_TOKENS).token_ids
    assert ours[:first_tie] == want[:first_tie]


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

    engines = {e: Generator.load(smol_s8, engine=e, kernel="matmulnbits")  # its 4.9% error
               for e in ("numpy", "ort")}
    ids = engines["numpy"].encode_chat([{"role": "user", "content": GOLDEN_PROMPT}])
    ref, ours = (engines[e].engine.forward(ids, 0) for e in ("numpy", "ort"))
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 0.06  # measured 4.9%
    assert ours.argmax() in np.argsort(-ref)[:2]


def _llama_cpp_rope_factors(theta: float, dim: int, s: dict) -> np.ndarray:
    """The rope_freqs values llama.cpp's convert_hf_to_gguf.py writes for llama3 rope scaling
    (LlamaModel.generate_extra_tensors), restated here independently of edgellm.arch.rope."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < s["original_max_position_embeddings"] / s["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > s["original_max_position_embeddings"] / s["low_freq_factor"]:
            factors.append(s["factor"])
        else:
            smooth = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                      / (s["high_freq_factor"] - s["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.asarray(factors, np.float32)


def _copy_gguf_with_tensor(src, dst, name: str, values: np.ndarray):
    """src's metadata and tensors, bytes unchanged, plus one float32 tensor."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.add_tensor_info(name, values.shape, values.dtype, values.nbytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.write_tensor_data(values)
    writer.close()


def _edited_copy(artifact, dst, rope_scaling):
    """A copy of artifact with an fp32 hidden state and (unless None) another rope scaling in its
    manifest, for the numpy engine (ONNX graphs keep what they were built with)."""
    import json
    import shutil

    shutil.copytree(artifact, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["hidden_state_type"] = "fp32"
    if rope_scaling is not None:
        manifest["config"]["rope_scaling"] = rope_scaling
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_llama31_gguf_rope_freqs_give_the_llama3_scaling(smol_gguf, smol_s8, tmp_path):
    """Llama-3.1/3.2 GGUFs keep their llama3 rope scaling as a `rope_freqs` tensor, not metadata.
    SmolLM2's GGUF with such a tensor added builds, and computes what the same artifact computes
    with the llama3 parameters in its config (the llama3 rule is held to transformers in
    test_parity); without the tensor the logits differ, so the tensor is not ignored."""
    import json

    from edgellm.compiler import BuildOptions, build

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = json.loads((smol_s8 / "manifest.json").read_text())["config"]
    factors = _llama_cpp_rope_factors(config["rope_theta"], config["head_dim"], llama3)
    assert 1.0 < factors.max() and factors.min() == 1.0  # some frequencies scaled, some not
    _copy_gguf_with_tensor(smol_gguf, tmp_path / "llama31.gguf", "rope_freqs.weight", factors)
    with_freqs = build(tmp_path / "llama31.gguf", tmp_path / "freqs",
                       BuildOptions(kv_cache_len=512, weight_type="s8"))
    scaling = json.loads((with_freqs / "manifest.json").read_text())["config"]["rope_scaling"]
    assert scaling["rope_type"] == "freq_factors"
    np.testing.assert_array_equal(scaling["factors"], factors)

    # the comparisons run the numpy engine with an fp32 hidden state: through a bf16 KV cache
    # the 5e-8 float32 rounding of the stored factors flips bf16 roundings (0.2 of 30 in logits)
    with_llama3 = _edited_copy(smol_s8, tmp_path / "llama3", llama3)
    freqs_fp32 = _edited_copy(with_freqs, tmp_path / "freqs-fp32", None)
    plain_fp32 = _edited_copy(smol_s8, tmp_path / "plain-fp32", None)

    ids = Generator.load(smol_s8).encode_chat([{"role": "user", "content": GOLDEN_PROMPT}])
    logits = {}
    for name, art, kind in [("freqs", freqs_fp32, "numpy"), ("llama3", with_llama3, "numpy"),
                            ("plain", plain_fp32, "numpy"), ("freqs bf16", with_freqs, "numpy"),
                            ("freqs ort", with_freqs, "ort")]:
        engine = Generator.load(art, engine=kind).engine
        logits[name] = engine.forward(ids, 0, all_logits=True)
    top = np.abs(logits["llama3"]).max()
    np.testing.assert_allclose(logits["freqs"], logits["llama3"], atol=1e-5 * top)
    assert np.abs(logits["plain"] - logits["llama3"]).max() > 0.05 * top
    # the ORT graphs carry the same rotary tables: at the last position ORT stays as close to the
    # numpy engine as without scaling (test above: 4.9%), and far closer than to the unscaled model
    ort, ref = logits["freqs ort"][-1], logits["freqs bf16"][-1]
    assert np.abs(ort - ref).max() / np.abs(ref).max() < 0.08  # measured 5.5%
    assert np.abs(ort - ref).mean() < 0.5 * np.abs(ort - logits["plain"][-1]).mean()


@pytest.fixture(scope="module")
def qwen_s4_default(qwen_gguf, tmp_path_factory):
    from edgellm.compiler import BuildOptions, build

    return build(qwen_gguf, tmp_path_factory.mktemp("qwen-s4") / "qwen-s4",
                 BuildOptions(kv_cache_len=512, weight_type="s4"))


def test_the_default_s4_build_answers_and_calls_tools(qwen_s4_default):
    """`--weight-type s4` alone (group 32, asymmetric, s8 lm_head): the old default (group 128,
    all s4) named Paris as the capital of Italy and wrote this call as <name>...</name> text."""
    from edgellm.chat.tools import parse_tool_calls

    gen = Generator.load(qwen_s4_default, engine="ort")
    m = gen.artifact.manifest
    assert (m.weight_scheme["group_size"], m.weight_scheme["symmetric"],
            m.post_scheme["name"], m.post_scheme["group_size"]) == (32, False, "s8", 128)
    for country, capital in (("France", "Paris"), ("Italy", "Rome")):
        ids = gen.encode_chat([{"role": "user", "content": f"What is the capital of {country}?"}])
        assert capital in gen.generate(ids, SamplingConfig(), max_new_tokens=30).text
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    text = gen.template.render([{"role": "user", "content": "What is the weather in Paris right "
                                                            "now?"}],
                               add_generation_prompt=True, tools=tools)
    ids = gen.tokenizer.encode(text, add_special_tokens=False).ids
    parsed = parse_tool_calls(gen.generate(ids, SamplingConfig(), max_new_tokens=60).text, tools)
    # (the arguments' layout is the model's: since the lm_head took s8's own layout it writes
    # them over three lines, a near tie of whitespace)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in parsed.calls] == [("get_weather", {"city": "Paris"})]


# Gemma 3 270M (base, Q4_K_M GGUF, mostly Q5_0): a raw prompt with BOS, no chat template.
GEMMA_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma_reference(gemma_gguf, gemma_s8):
    """transformers float32 on the dequantized GGUF: the prompt ids (the artifact's tokenizer),
    32 greedy tokens, and the teacher-forced logits along prompt + tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gen = Generator.load(gemma_s8, engine="numpy")
    ids = gen.tokenizer.encode(GEMMA_PROMPT).ids
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gemma_gguf.parent, gguf_file=gemma_gguf.name, dtype=torch.float32,
        quantization_config=transformers.GgufConfig(dequantize=True))
    hf_ids = transformers.AutoTokenizer.from_pretrained(
        gemma_gguf.parent, gguf_file=gemma_gguf.name)(GEMMA_PROMPT).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        logits = model(out).logits[0].numpy()
    return ids, hf_ids, out[0, len(ids):].tolist(), logits


@pytest.mark.parametrize("engine", ["numpy", "ort"])
def test_gemma3_follows_the_float32_reference(gemma_s8, gemma_reference, engine):
    """Teacher-forced along the reference's 32 greedy tokens, each engine picks the reference's
    token wherever the reference's top two are more than 0.05 apart (measured on the s8
    artifact, 2026-12-02: numpy differs at 2 positions, gaps 0.014 and 0.019; ORT at 1, gap
    0.019 — near ties)."""
    ids, hf_ids, tokens, ref = gemma_reference
    assert ids == hf_ids and ids[0] == 2  # the same tokenizer, BOS first
    e = Generator.load(gemma_s8, engine=engine, threads=2).engine
    seq = ids + tokens
    ours = np.concatenate([e.forward(ids, 0, all_logits=True)[-1:]] +
                          [e.forward([t], p)[None] for p, t in enumerate(tokens[:-1], len(ids))])
    ref = ref[len(ids) - 1:len(seq) - 1]
    assert (ref.argmax(-1) == tokens).all()
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 0.05
    agree = ours.argmax(-1) == ref.argmax(-1)
    assert decisive.sum() >= N_TOKENS - 4 and agree[decisive].all(), np.where(~agree)


def test_gemma3_free_greedy_equals_the_reference_until_a_near_tie(gemma_s8, gemma_reference):
    """ORT, greedy, no speculation: the reference's tokens up to its first near tie (top two
    within 0.05 in float32); measured: 31 of 32 tokens."""
    ids, _, tokens, ref = gemma_reference
    gen = Generator.load(gemma_s8, engine="ort", threads=2)
    ours = gen.generate(ids, SamplingConfig(), max_new_tokens=N_TOKENS, speculate="off").token_ids
    top2 = np.sort(ref[len(ids) - 1:], axis=-1)[:, -2:]
    near = [i for i, (a, b) in enumerate(top2[:N_TOKENS]) if b - a <= 0.05]
    same = next((i for i, (a, b) in enumerate(zip(ours, tokens)) if a != b), N_TOKENS)
    assert same == N_TOKENS or same in near, (same, near)
    assert same >= 8  # " the capital of the country of France." at least


def test_gemma3_names_paris(gemma_s8):
    """The base model continues "The capital of France is" with " the capital of the country
    of France." (float32 does too), so the Paris check completes a sentence that asks for it."""
    gen = Generator.load(gemma_s8, threads=2)
    ids = gen.tokenizer.encode("The capital of France is the city of").ids
    assert "Paris" in gen.generate(ids, SamplingConfig(), max_new_tokens=8).text
