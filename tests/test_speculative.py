"""Speculative decoding by prompt lookup: the same tokens as plain greedy decoding, the same
distribution when sampling, a KV cache that stays right after rejected drafts, and grammar masks
that hold."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from edgellm.runtime.generator import Generator
from edgellm.runtime.sampler import Sampler, SamplingConfig
from edgellm.runtime.speculative import PromptLookup
from edgellm.server.metrics import parse
from helpers import make_tiny_model

GREEDY = SamplingConfig()
# greedy with a repetition penalty: the tiny models' answers vary instead of repeating one
# token, so drafts are both kept and rejected (and the choice depends on the history)
VARIED = SamplingConfig(repetition_penalty=1.5, penalty_window=6)


def _tiny(tmp_path_factory, boost: float):
    from edgellm.compiler import BuildOptions, build

    src = tmp_path_factory.mktemp("src") / "hf"
    make_tiny_model(src, "llama", tied=True, scale=3.0, embed_boost=boost)
    return build(src, tmp_path_factory.mktemp("art") / "a",
                 BuildOptions(kv_cache_len=160, prefill_len=8))


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    return _tiny(tmp_path_factory, 5.0)


@pytest.fixture(scope="module")
def peaked_artifact(tmp_path_factory):
    """Peaked distributions (answers repeat): drafts at almost every step when sampling."""
    return _tiny(tmp_path_factory, 20.0)


def _prompts(gen) -> list[list[int]]:
    texts = ["hello world hello world hello", "the capital of france is paris. the capital of",
             "paris is the capital. hello paris, hello world, the capital", "world " * 6]
    return [gen.encode_chat([{"role": "user", "content": t}]) for t in texts]


# -- the drafter ------------------------------------------------------------------------------

def test_lookup_copies_what_followed_the_latest_earlier_match():
    lookup = PromptLookup(k=3)
    lookup.extend([5, 6, 7, 8, 9, 1, 2, 5, 6, 7, 4, 4, 1, 2])
    assert lookup.propose(room=10) == [5, 6, 7]  # "1 2" was followed by "5 6 7"
    lookup.extend([5, 6, 7])
    assert lookup.propose(room=10) == [4, 4, 1]  # "6 7" latest: "4 4 1"; longest n-gram wins
    assert lookup.propose(room=2) == [4, 4]


def test_lookup_proposes_nothing_without_a_match():
    lookup = PromptLookup()
    lookup.extend(list(range(50)))
    assert lookup.propose(room=10) == []


def test_k_adapts_and_drafting_pauses_after_misses():
    lookup = PromptLookup(k=4, k_max=6, patience=2, pause=3)
    lookup.update(4, 4)
    assert lookup.k == 5
    lookup.update(5, 0)
    assert lookup.k == 2
    lookup.update(2, 0)  # a second draft in a row that bought nothing: k 1, and a pause
    lookup.extend([1, 2, 3, 1, 2])
    assert [lookup.propose(room=10) for _ in range(4)] == [[], [], [], [3]]


# -- exactness --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["lookup", "auto"])
def test_greedy_speculation_gives_plain_greedy_tokens_on_numpy(tiny_artifact, mode):
    gen = Generator.load(tiny_artifact, engine="numpy")
    proposed = accepted = 0
    for ids in _prompts(gen):
        plain = gen.generate(ids, VARIED, 60)
        spec = gen.generate(ids, VARIED, 60, speculate=mode)
        assert spec.token_ids == plain.token_ids and spec.text == plain.text
        assert spec.stop_reason == plain.stop_reason
        proposed += spec.speculation.proposed
        accepted += spec.speculation.accepted
    assert 0 < accepted < proposed  # drafts were kept and drafts were rejected


def test_kv_cache_is_right_after_rejected_drafts(tiny_artifact):
    """Continue a conversation after a speculative answer (positions past the accepted tokens
    were written by rejected drafts): the logits equal a fresh computation of the same text."""
    gen = Generator.load(tiny_artifact, engine="numpy")
    ids = _prompts(gen)[2]
    first = gen.generate(ids, VARIED, 40, speculate="lookup")
    s = first.speculation
    assert s.accepted < s.proposed, "the answer must have rejected drafts for this test"
    assert gen.cached_ids == (ids + first.token_ids)[:len(gen.cached_ids)]
    follow = ids + first.token_ids + gen.tokenizer.encode(" hello world").ids
    reused = gen.reusable_prefix(follow)
    assert reused >= len(ids) + len(first.token_ids) - 1
    ours = gen.prefill(follow[reused:], reused)
    fresh = Generator.load(tiny_artifact, engine="numpy").prefill(follow)
    np.testing.assert_allclose(ours, fresh, rtol=1e-4, atol=1e-4)
    assert int(np.argmax(ours)) == int(np.argmax(fresh))


def test_ort_speculation_matches_plain_greedy(tiny_artifact):
    gen = Generator.load(tiny_artifact, engine="ort", threads=1)
    for ids in _prompts(gen):
        plain = gen.generate(ids, VARIED, 60)
        assert gen.generate(ids, VARIED, 60, speculate="lookup").token_ids == plain.token_ids


def test_rejection_rule_keeps_the_distribution():
    """Accept a drafted token with probability p(d), else draw from p without d: every token's
    frequency is p. 40,000 draws against the exact probabilities."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=12) * 1.5
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=1))
    _, probs = sampler.distribution(logits, [])
    order, _ = sampler.distribution(logits, [])
    p = np.zeros(12)
    p[order] = probs
    draft, n = int(order[0]), 40_000
    counts = np.zeros(12)
    for _ in range(n):
        token = draft if sampler.accepts(logits, [], draft) else sampler(logits, [], exclude=draft)
        counts[token] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < _chi2_bound(11), (chi2, counts / n, p)


def _chi2_bound(df: int, z: float = 3.29) -> float:
    """The chi-square quantile at p = 0.0005 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@pytest.mark.slow
def test_speculative_sampling_matches_plain_sampling_frequencies(peaked_artifact):
    """Thousands of sampled answers, plain and speculative (independent seeds): the frequencies
    of the tokens at the positions drafts were verified at agree (a two-sample chi-square bound).
    Temperature 2 flattens the peaked model enough that drafts are often rejected: this test
    fails if the rejected token is not taken out of the next draw (measured: chi-square 108
    against a bound of 52)."""
    gen = Generator.load(peaked_artifact, engine="numpy")
    ids = _prompts(gen)[3]
    sampling = lambda seed: SamplingConfig(temperature=2.0, seed=seed)  # noqa: E731
    counts: dict[str, dict[tuple, int]] = {"off": {}, "lookup": {}}
    proposed = 0
    n = 2000
    for mode in counts:
        for seed in range(n) if mode == "off" else range(n, 2 * n):
            r = gen.generate(ids, sampling(seed), 3, reuse_cache=True, speculate=mode)
            key = tuple(r.token_ids[1:3])
            counts[mode][key] = counts[mode].get(key, 0) + 1
            proposed += r.speculation.proposed if r.speculation else 0
    assert proposed > n // 2, "drafts must be proposed for the test to mean anything"
    keys = sorted(set(counts["off"]) | set(counts["lookup"]))
    a = np.array([counts["off"].get(k, 0) for k in keys], float)
    b = np.array([counts["lookup"].get(k, 0) for k in keys], float)
    common = (a + b) >= 10  # pool rare outcomes into one cell
    a = np.append(a[common], a[~common].sum())
    b = np.append(b[common], b[~common].sum())
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    chi2 = float((((a - b) ** 2) / (a + b)).sum())  # equal sample sizes
    assert len(a) >= 3
    assert chi2 < _chi2_bound(len(a) - 1), (chi2, len(a))


# -- under a grammar (real model) -------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string"}, "country": {"type": "string"},
    "population": {"type": "integer", "minimum": 0}},
    "required": ["city", "country", "population"], "additionalProperties": False}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [None, 1, 2])
def test_speculation_under_a_json_schema_mask_stays_valid(qwen_s8, seed):
    from edgellm.chat.constrained import ToolCallGrammar

    gen = Generator.load(qwen_s8, threads=2)
    grammar = ToolCallGrammar.for_generator(gen)
    ids = gen.encode_chat([{"role": "user", "content":
                            'Fill in {"city": "San Francisco", "country": "United States of '
                            'America", "population": 808437} as JSON, exactly as given.'}])
    sampling = GREEDY if seed is None else SamplingConfig(temperature=1.5, seed=seed)
    r = gen.generate(ids, sampling, 80, mask=grammar.json_schema(SCHEMA), speculate="lookup")
    jsonschema.validate(json.loads(r.text), SCHEMA)
    assert r.speculation.proposed > 0
    if seed is None:
        plain = gen.generate(ids, sampling, 80, mask=grammar.json_schema(SCHEMA))
        assert r.token_ids == plain.token_ids
        assert r.speculation.accepted > 0


# -- where generation runs: run, bench, serve -------------------------------------------------

def test_run_json_reports_drafts(tiny_artifact):
    from helpers import edgellm

    out = edgellm("run", str(tiny_artifact), "-p", "hello world hello world hello", "--json",
                  "--engine", "numpy", "--speculate", "lookup", "--repetition-penalty", "1.5",
                  "--penalty-window", "6", "--max-new-tokens", "40")
    assert out.returncode == 0, out.stderr
    spec = json.loads(out.stdout)["speculation"]
    assert spec["draft_proposed"] >= spec["draft_accepted"] > 0 and spec["forwards"] > 0
    plain = edgellm("run", str(tiny_artifact), "-p", "hello world hello world hello", "--json",
                    "--engine", "numpy", "--speculate", "off", "--repetition-penalty", "1.5",
                    "--penalty-window", "6", "--max-new-tokens", "40")
    assert "speculation" not in json.loads(plain.stdout)
    assert json.loads(plain.stdout)["token_ids"] == json.loads(out.stdout)["token_ids"]


def test_bench_prompt_file_measures_plain_and_speculative(tiny_artifact, tmp_path):
    from helpers import edgellm

    prompt = tmp_path / "p.txt"
    prompt.write_text("world " * 6)
    out = edgellm("bench", str(tiny_artifact), "--prompt-file", str(prompt), "--gen-tokens", "30",
                  "--repeats", "1", "--speculate", "lookup", "--engine", "numpy", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["same_answer"] is True and r["draft_proposed"] > 0
    assert r["tokens_per_forward"] > 1 and r["speedup"] > 0
    missing = edgellm("bench", str(tiny_artifact), "--prompt-file", str(tmp_path / "none.txt"))
    assert missing.returncode == 1 and missing.stderr.startswith("edgellm: error:")
    prompt.write_text("world " * 150)
    long = edgellm("bench", str(tiny_artifact), "--prompt-file", str(prompt), "--gen-tokens", "30")
    assert long.returncode == 1 and "--gen-tokens 30 exceed the KV cache of 160" \
        in long.stderr and "--ctx-size 256" in long.stderr, long.stderr


def test_metrics_count_drafts(tiny_artifact):
    from starlette.testclient import TestClient

    from edgellm.server.app import create_app

    app = create_app(Generator.load(tiny_artifact, engine="numpy"), "tiny", speculate="lookup")
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 40, "temperature": 0,
            "messages": [{"role": "user", "content": "world " * 6}]})
        assert r.status_code == 200, r.text
        metrics = parse(client.get("/metrics").text)
    assert int(metrics["edgellm_draft_tokens_proposed_total"]) > 0
    assert 0 < int(metrics["edgellm_draft_tokens_accepted_total"]) \
        <= int(metrics["edgellm_draft_tokens_proposed_total"])


def test_lookup_never_pauses_and_auto_does():
    from edgellm.runtime.speculative import drafter

    assert drafter("off") is None
    for mode, pauses in (("auto", True), ("lookup", False)):
        lookup = drafter(mode)
        lookup.extend([1, 2, 3, 1, 2])
        for _ in range(6):
            lookup.update(1, 0)
        assert (lookup.propose(room=10) == []) is pauses, mode
