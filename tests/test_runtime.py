"""Sampler, streaming text and the run command on a tiny artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgellm.runtime.generator import Generator
from edgellm.text import TextStream
from edgellm.runtime.sampler import Sampler, SamplingConfig
from helpers import edgellm, make_tiny_model


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from edgellm.compiler import BuildOptions, build

    src = tmp_path_factory.mktemp("src") / "hf"
    make_tiny_model(src, "llama", tied=True, scale=3.0, embed_boost=20.0)
    return build(src, tmp_path_factory.mktemp("art") / "a",
                 BuildOptions(kv_cache_len=64, prefill_len=8))


def test_greedy_takes_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingConfig())(logits, []) == 1


def test_repetition_penalty_moves_off_a_repeated_token():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    s = Sampler(SamplingConfig(repetition_penalty=1.2))
    assert s(logits, [1]) == 2  # 3.0 / 1.2 = 2.5 < 2.9
    assert s(logits, [1] + [0] * 20) == 1  # token 1 left the window of 20


def test_top_k_1_is_greedy_and_seed_reproduces():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000)
    assert Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=5))(logits, []) == logits.argmax()
    draws = [[Sampler(SamplingConfig(temperature=1.0, seed=7))(logits, []) for _ in range(5)]
             for _ in range(2)]
    assert draws[0] == draws[1]


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingConfig(temperature=1.0, top_p=0.7, seed=0))
    assert {s(logits, []) for _ in range(200)} == {0, 1}


def test_sampling_frequencies_follow_temperature():
    logits = np.log(np.array([0.6, 0.4]))
    s = Sampler(SamplingConfig(temperature=1.0, seed=1))
    share = np.mean([s(logits, []) == 0 for _ in range(4000)])
    assert abs(share - 0.6) < 0.03


def test_stream_never_splits_a_utf8_character(smol_gguf):
    from edgellm.compiler.sources import GGUFSource

    tok = Tokenizer.from_str(GGUFSource(smol_gguf).tokenizer().tokenizer_json)
    text = "naïve 東京 🦙🚀 done"
    ids = tok.encode(text, add_special_tokens=False).ids
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_generate_is_deterministic_and_stops_at_length(tiny_artifact):
    gen = Generator.load(tiny_artifact)
    ids = gen.encode_chat([{"role": "user", "content": "hello world"}])
    a = gen.generate(ids, SamplingConfig(temperature=0.8, seed=3), max_new_tokens=6)
    b = gen.generate(ids, SamplingConfig(temperature=0.8, seed=3), max_new_tokens=6)
    assert a.token_ids == b.token_ids
    assert len(a.token_ids) == 6 or a.stop_reason == "eos"


def test_generation_stops_when_the_kv_cache_is_full(tiny_artifact):
    gen = Generator.load(tiny_artifact)
    ids = list(range(3, 3 + 60))  # 60 of 64 positions
    result = gen.generate(ids, SamplingConfig(), max_new_tokens=50)
    assert result.stop_reason in ("kv_cache_full", "eos")
    if result.stop_reason == "kv_cache_full":
        assert len(result.token_ids) == 64 - 60 + 1  # the last token needs no cache slot


def test_run_json_has_the_promised_keys(tiny_artifact):
    done = edgellm("run", tiny_artifact, "-p", "hello", "--max-new-tokens", "5", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert set(out) >= {"text", "token_ids", "prompt_tokens", "ttft_ms", "prefill_tok_s",
                        "decode_tok_s"}
    assert out["prompt_tokens"] > 0 and len(out["token_ids"]) <= 5


def test_run_prints_stats(tiny_artifact):
    done = edgellm("run", tiny_artifact, "-p", "hello", "--max-new-tokens", "3")
    assert done.returncode == 0, done.stderr
    assert "ttft:" in done.stderr and "decode:" in done.stderr and "tok/s" in done.stderr


def test_bench_json_has_the_promised_keys(tiny_artifact):
    done = edgellm("bench", tiny_artifact, "--prompt-tokens", "16", "--gen-tokens", "8",
                   "--repeats", "1", "--threads", "1", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert {"prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "threads",
            "weight_type"} <= set(out)
    assert out["threads"] == 1 and out["weight_type"] == "s8" and out["decode_tok_s"] > 0


def test_bench_refuses_lengths_over_the_kv_cache(tiny_artifact):
    done = edgellm("bench", tiny_artifact, "--prompt-tokens", "60", "--gen-tokens", "8")
    assert done.returncode == 1 and "exceeds the KV cache of 64" in done.stderr
    assert "--ctx-size" in done.stderr  # the way to a longer one, no rebuild
    longer = edgellm("bench", tiny_artifact, "--prompt-tokens", "60", "--gen-tokens", "8",
                     "--ctx-size", "128", "--repeats", "1", "--json")
    assert longer.returncode == 0, longer.stderr
    assert json.loads(longer.stdout)["context"] == 128


@pytest.mark.parametrize("engine", ["numpy", "ort"])
def test_kv_reuse_across_turns_gives_the_same_tokens(tiny_artifact, engine):
    gen = Generator.load(tiny_artifact, engine=engine)
    first = [{"role": "user", "content": "hello world"}]
    answer = gen.generate(gen.encode_chat(first), SamplingConfig(), 5, reuse_cache=True)
    second = first + [{"role": "assistant", "content": answer.text},
                      {"role": "user", "content": "the capital"}]
    ids = gen.encode_chat(second)
    reused = gen.generate(ids, SamplingConfig(), 6, reuse_cache=True)
    fresh = Generator.load(tiny_artifact, engine=engine).generate(ids, SamplingConfig(), 6)
    assert reused.reused_tokens >= len(gen.encode_chat(first)) - 1
    assert reused.token_ids == fresh.token_ids


def test_stop_strings_cut_text_and_stream(smol_s8):
    gen = Generator.load(smol_s8)
    ids = gen.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    full = gen.generate(ids, SamplingConfig(), 20).text
    assert "Paris" in full
    pieces = []
    cut = gen.generate(ids, SamplingConfig(), 20, stop=("Paris",), on_text=pieces.append)
    assert cut.stop_reason == "stop"
    assert cut.text == full[:full.index("Paris")] == "".join(pieces)


@pytest.mark.parametrize("engine", ["numpy", "ort"])
def test_prefix_cache_slots_serve_alternating_conversations(tiny_artifact, engine):
    from edgellm.runtime.cache_reuse import common_prefix
    from edgellm.runtime.prefix_cache import PrefixCache

    gen = Generator.load(tiny_artifact, engine=engine)
    cache = PrefixCache(gen, slots=2, min_gain=4)
    convo = {name: [{"role": "system", "content": f"{name} system " * 3}] for name in "AB"}

    def ask(name, text):
        ids = gen.encode_chat(convo[name] + [{"role": "user", "content": text}])
        cache.prepare(ids)
        return ids, gen.generate(ids, SamplingConfig(), 3, reuse_cache=True)

    first_ids, _ = ask("A", "hello")
    ask("B", "world")
    ids, result = ask("A", "paris")  # A's prefix comes back from its slot
    shared = common_prefix(first_ids, ids)
    assert shared > 30 and cache.swaps == 1 and result.reused_tokens == shared
    fresh = Generator.load(tiny_artifact, engine=engine).generate(ids, SamplingConfig(), 3)
    assert result.token_ids == fresh.token_ids


def _resident() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_freed_heap_memory_goes_back_to_the_system():
    """machine.give_back_freed_memory really returns freed pages in the middle of the heap
    (free() alone keeps them: a block still in use sits above them)."""
    import ctypes

    from edgellm.machine import give_back_freed_memory

    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim
    except (AttributeError, OSError):
        pytest.skip("no glibc malloc_trim on this platform (a no-op there)")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 << 10) for _ in range(640)]  # 40 MB below the mmap threshold
    for b in blocks:
        ctypes.memset(b, 1, 64 << 10)
    for b in blocks[:-1]:
        libc.free(b)
    held = _resident()
    give_back_freed_memory()
    released = held - _resident()
    libc.free(blocks[-1])
    assert released > 20 << 20, released


def test_the_engine_gives_back_what_load_and_a_prompt_left(tiny_artifact, monkeypatch):
    from edgellm.runtime import generator, ort_engine

    calls = []
    for module in (generator, ort_engine):
        monkeypatch.setattr(module, "give_back_freed_memory", lambda: calls.append(1))
    gen = Generator.load(tiny_artifact, engine="ort", threads=1)
    assert len(calls) == 1  # after the sessions packed their weights
    step = gen.engine.prefill_len
    gen.prefill(list(range(1, step)))  # under one chunk: nothing worth the call
    assert len(calls) == 1
    gen.prefill(list(range(1, 2 * step + 3)))
    assert len(calls) == 2
