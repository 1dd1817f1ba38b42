"""tokenizer.json built from GGUF metadata encodes exactly like the models' HF tokenizers."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from edgellm.compiler.sources import GGUFSource

SAMPLES = [
    "The quick brown fox jumps over the lazy dog. It's 2026, isn't it?",
    "東京は日本の首都です。ひらがなとカタカナ、漢字。",
    "我想在苹果公司工作，今天天气很好！",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tprint(fib(10))",
    "emoji 🦙🚀 😶‍🌫️ ✅ 👨‍👩‍👧‍👦 and numbers 1234567 3.14159",
    "  leading spaces, trailing\n\n\n  newlines\r\n and <|im_start|>special<|im_end|> tokens",
]


def _cases(vocab_dir, name):
    inputs = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    outputs = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs, outputs)]


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe", "llama-spm", "phi-3"])
def test_matches_hf_ids_recorded_by_llama_cpp(vocab_dir, name):
    """llama.cpp's .inp/.out pairs were produced by the models' own HF tokenizers."""
    tok = Tokenizer.from_str(GGUFSource(vocab_dir / f"ggml-vocab-{name}.gguf").tokenizer()
                             .tokenizer_json)
    cases = _cases(vocab_dir, name)
    assert len(cases) > 40
    for text, expected in cases:
        assert tok.encode(text, add_special_tokens=False).ids == expected, text


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen_gguf", "smol_gguf"])
def test_real_model_tokenizer_matches_transformers(model, request):
    """On the real GGUFs, against transformers' own GGUF tokenizer conversion."""
    transformers = pytest.importorskip("transformers")
    path = request.getfixturevalue(model)
    ours = Tokenizer.from_str(GGUFSource(path).tokenizer().tokenizer_json)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SAMPLES:
        if model == "smol_gguf":
            # SmolLM2's own tokenizer.json splits digits one by one (llama.cpp's "smollm"
            # pre-tokenizer); transformers' GGUF conversion does not, so compare digit-free text
            text = "".join(c for c in text if not c.isdigit())
        expected = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False).ids == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == theirs.decode(expected)


def test_smollm_splits_digits_one_by_one(smol_gguf):
    tok = Tokenizer.from_str(GGUFSource(smol_gguf).tokenizer().tokenizer_json)
    pieces = tok.encode("year 2026", add_special_tokens=False).tokens
    assert pieces[-4:] == ["2", "0", "2", "6"]
