"""Several requests at once (issue 19): `serve --parallel N` runs N slots whose decode steps are
batched into one engine call (runtime.batch); each request's answer is its answer alone."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from edgellm.server.metrics import parse
from helpers import edgellm, make_tiny_model, start_server

TOOL = {"type": "function", "function": {
    "name": "set_alarm", "parameters": {"type": "object", "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23}}, "required": ["hour"],
        "additionalProperties": False}}}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batching")
    make_tiny_model(tmp / "hf", "qwen2", tied=False)
    done = edgellm("build", tmp / "hf", "-o", tmp / "art", "--kv-cache-len", "1024")
    assert done.returncode == 0, done.stderr
    return tmp / "art"


def _gen(artifact, engine, slots=1):
    from edgellm.runtime.generator import Generator

    qgemm = engine == "ort-qgemm" or None  # the 8-bit weights re-laid as on a Cortex-A53
    return Generator.load(artifact, engine=engine.split("-")[0], threads=1, slots=slots,
                          kernel="qgemm" if qgemm else "auto",
                          cache_type="int8" if engine == "ort-int8" else "fp32")


@pytest.mark.parametrize("engine", ["numpy", "ort", "ort-qgemm", "ort-int8"])
def test_batched_rows_compute_what_each_slot_computes_alone(artifact, engine):
    """decode_rows over slots 0..2 (slot 1 without a request) = one-slot forwards; on QGEMM
    too, whose activation rows are quantized each with its own scale (a batch of rows once
    failed there: QuantizeLinear took one scale per position of one sequence); and with an
    int8 cache (--cache-type int8)."""
    batched, alone = _gen(artifact, engine, 3).engine, _gen(artifact, engine).engine
    a, b = [5, 6, 7, 8, 9], [20, 21, 22]
    batched.forward(a, 0, slot=0)
    batched.forward(b, 0, slot=2)
    rows = batched.decode_rows(0, [30, -1, 31], [5, 0, 3])
    alone.forward(a, 0)
    np.testing.assert_allclose(rows[0], alone.forward([30], 5), atol=1e-5)
    alone.forward(b, 0)
    np.testing.assert_allclose(rows[2], alone.forward([31], 3), atol=1e-5)


def _ask(client, body: dict, out: dict, key):
    r = client.post("/v1/chat/completions", json=body)
    out[key] = r.json()["choices"][0] if r.status_code == 200 else (r.status_code, r.text)


def _concurrently(client, bodies: list[dict]) -> dict:
    out: dict = {}
    threads = [threading.Thread(target=_ask, args=(client, b, out, i)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _bodies():
    words = ["apple", "river", "stone", "cloud"]
    return [{"model": "m", "messages": [{"role": "user", "content": f"{w} " * (3 + i)}],
             "max_tokens": 40, "temperature": 0} for i, w in enumerate(words)]


def test_four_concurrent_greedy_answers_equal_each_answer_alone(artifact):
    """The numpy engine: exactly (its batch runs row by row through the same code)."""
    from starlette.testclient import TestClient

    from edgellm.server.app import create_app

    bodies = _bodies()
    with TestClient(create_app(_gen(artifact, "numpy"), "m")) as c:
        alone = {i: c.post("/v1/chat/completions", json=b).json()["choices"][0]
                 for i, b in enumerate(bodies)}
    app = create_app(_gen(artifact, "numpy", 4), "m")
    with TestClient(app) as c:
        together = _concurrently(c, bodies)
        metrics = c.get("/metrics").text
    assert together == alone
    steps = parse(metrics)
    assert steps["edgellm_slots"] == 4 and steps["edgellm_active_slots"] == 0
    assert steps["edgellm_batch_steps_total"] > 0
    assert 1 < steps["edgellm_batch_size_mean"] <= 4  # the mean since start, not of a window


def test_on_ort_concurrent_greedy_answers_leave_their_own_only_at_near_ties(artifact):
    """ORT's kernels for 4 rows accumulate in another order than for one, so a batched answer
    may leave its answer alone, but only where the two best logits (alone) nearly tie."""
    from edgellm.runtime.batch import Batcher, SlotEngine
    from edgellm.runtime.sampler import SamplingConfig

    greedy = SamplingConfig(temperature=0)
    prompts = [list(range(10 + 7 * i, 20 + 9 * i)) for i in range(4)]
    alone_gen = _gen(artifact, "ort")
    alone = [alone_gen.generate(p, greedy, max_new_tokens=40).token_ids for p in prompts]
    gen = _gen(artifact, "ort", 4)
    batcher = Batcher(gen.engine)
    slots = [gen.for_engine(SlotEngine(batcher, i)) for i in range(4)]
    together: dict = {}
    runs = [threading.Thread(target=lambda i=i: together.update(
        {i: slots[i].generate(prompts[i], greedy, max_new_tokens=40).token_ids}))
        for i in range(4)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert max(n for _, n in batcher.recent) > 1  # the steps did run batched
    for i, prompt in enumerate(prompts):
        a, b = alone[i], together[i]
        d = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if d is None:
            assert a == b
            continue
        logits = alone_gen.engine.forward(prompt + a[:d], 0, all_logits=True)[-1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] < 1e-3 * np.abs(logits).max(), (i, d, top2)


def test_a_mixed_batch_gives_each_request_its_own_result(artifact):
    """A forced tool call under its grammar, a plain answer and one cut by `stop`, at once
    (the numpy engine: exactly as each alone)."""
    from starlette.testclient import TestClient

    from edgellm.server.app import create_app

    plain = _bodies()[0]
    tool = plain | {"tools": [TOOL], "tool_choice": "required", "max_tokens": 80}
    with TestClient(create_app(_gen(artifact, "numpy"), "m")) as c:
        alone = {"plain": c.post("/v1/chat/completions", json=plain).json()["choices"][0]}
        content = alone["plain"]["message"]["content"]
        first = content[12:15]  # a piece the answer reaches
        stop = _bodies()[0] | {"stop": [first]}
        alone["tool"] = c.post("/v1/chat/completions", json=tool).json()["choices"][0]
        alone["stop"] = c.post("/v1/chat/completions", json=stop).json()["choices"][0]
    with TestClient(create_app(_gen(artifact, "numpy", 3), "m")) as c:
        out = _concurrently(c, [tool, plain, stop])
    together = {"tool": out[0], "plain": out[1], "stop": out[2]}
    for answer in (together, alone):  # call ids are random
        answer["tool"]["message"]["tool_calls"][0]["id"] = "call"
    assert together == alone
    call = together["tool"]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "set_alarm" and 0 <= json.loads(call["arguments"])["hour"] <= 23
    assert together["stop"]["finish_reason"] == "stop"
    assert together["stop"]["message"]["content"] == content[:content.index(first)]


def test_an_idle_slots_cached_prefix_survives_the_others_batches(artifact):
    """Slot 1 keeps a conversation while slots 0 and 2 decode around it (its row in their
    batch has no request): reusing its prefix later answers as a fresh prefill does."""
    from edgellm.runtime.batch import Batcher, SlotEngine
    from edgellm.runtime.sampler import SamplingConfig

    gen = _gen(artifact, "ort", 3)
    batcher = Batcher(gen.engine)
    slots = [gen.for_engine(SlotEngine(batcher, i)) for i in range(3)]
    greedy = SamplingConfig(temperature=0)
    kept = list(range(40, 70))
    slots[1].generate(kept, greedy, max_new_tokens=4)
    batcher.release(1)
    runs = [threading.Thread(target=lambda s=s: slots[s].generate(
        list(range(80 + s, 100 + s)), greedy, max_new_tokens=30)) for s in (0, 2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    reused = slots[1].generate(kept + [71, 72], greedy, max_new_tokens=12, reuse_cache=True)
    fresh = _gen(artifact, "ort").generate(kept + [71, 72], greedy, max_new_tokens=12)
    assert reused.reused_tokens == len(kept) and reused.token_ids == fresh.token_ids


def test_a_prompt_prefilled_while_others_decode_keeps_its_cache_intact(artifact):
    """A 300-token prompt (three prefill chunks) on slot 1 while slots 0 and 2 decode around
    it: the batches between its chunks must not write into what its chunks wrote (slot 1's
    row in them has no request), so its K/V equal a prefill alone's, exactly (numpy)."""
    from edgellm.runtime.batch import Batcher, SlotEngine

    gen = _gen(artifact, "numpy", 3)
    batcher = Batcher(gen.engine, max_wait=1.0)  # (a loaded CI host must not time the step out)
    slots = [gen.for_engine(SlotEngine(batcher, i)) for i in range(3)]
    long_prompt = [(7 * i) % 250 + 3 for i in range(300)]
    done = threading.Event()

    def decode(s):  # a slot stepping until slot 1's prefill is over (no end of turn to stop it)
        slots[s].prefill(list(range(30 + s, 40 + s)))
        pos = 10
        while not done.is_set() and pos < 1000:
            slots[s].engine.forward([5 + s], pos)
            pos += 1
        batcher.release(s)

    runs = [threading.Thread(target=decode, args=(s,)) for s in (0, 2)]
    for t in runs:
        t.start()
    while batcher.steps < 3:  # they decode
        threading.Event().wait(0.01)
    steps = batcher.steps
    slots[1].prefill(long_prompt)
    during = batcher.steps - steps
    done.set()
    for t in runs:
        t.join()
    alone = _gen(artifact, "numpy").engine
    alone.forward(long_prompt[:128], 0)
    alone.forward(long_prompt[128:256], 128)
    alone.forward(long_prompt[256:], 256)
    assert during >= 2  # the others stepped between the chunks
    np.testing.assert_array_equal(gen.engine.k_slots[1][:, :300], alone.k_cache[:, :300])
    np.testing.assert_array_equal(gen.engine.v_slots[1][:, :300], alone.v_cache[:, :300])


def test_a_client_leaving_mid_stream_frees_its_slot_and_the_others_finish(artifact):
    import httpx

    from edgellm.server.app import create_app

    app = create_app(_gen(artifact, "ort", 2), "m")
    server, thread, url = start_server(app)
    try:
        long = {"model": "m", "messages": [{"role": "user", "content": "go on"}],
                "max_tokens": 150, "temperature": 0, "stream": True}
        other: dict = {}
        worker = threading.Thread(target=lambda: other.update(httpx.post(
            f"{url}/v1/chat/completions", json=_bodies()[1], timeout=60).json()))
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{url}/v1/chat/completions", json=long) as r:
                worker.start()
                lines = r.iter_lines()
                for _ in range(4):
                    next(lines)
            # left: the stream is closed with most of its 150 tokens ungenerated
        worker.join(60)
        assert other["choices"][0]["finish_reason"] in ("stop", "length")
        for _ in range(100):
            m = parse(httpx.get(f"{url}/metrics").text)
            if m["edgellm_active_slots"] == 0:
                break
            threading.Event().wait(0.1)
        assert m["edgellm_active_slots"] == 0 and m["edgellm_queue_depth"] == 0
        assert httpx.post(f"{url}/v1/chat/completions", json=_bodies()[2],
                          timeout=60).status_code == 200
    finally:
        server.should_exit = True
        thread.join()


def test_parallel_is_checked_against_the_artifact_and_memory(artifact, tmp_path):
    from edgellm.artifact.reader import load_artifact
    from edgellm.errors import EdgeLLMError
    from edgellm.server.serving import slots_for

    art = load_artifact(artifact)
    assert slots_for(art, None) == 4  # a tiny model: four fit
    assert slots_for(art, 2) == 2
    with pytest.raises(EdgeLLMError, match="at least 1"):
        slots_for(art, 0)
    with pytest.raises(EdgeLLMError, match="KV caches"):
        slots_for(art, 10**6)
    old = tmp_path / "old"  # an artifact from before the graphs took a batch
    import shutil

    shutil.copytree(artifact, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["graphs"]["batch"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert slots_for(load_artifact(old), None) == 1
    with pytest.raises(EdgeLLMError, match="rebuild it for --parallel 2"):
        slots_for(load_artifact(old), 2)


def test_plan_counts_a_kv_cache_per_parallel_request(artifact):
    one = json.loads(edgellm("plan", artifact, "--board", "rpi5", "--json").stdout)["rows"]
    four = json.loads(edgellm("plan", artifact, "--board", "rpi5", "--parallel", "4",
                              "--json").stdout)["rows"]
    for a, b in zip(one, four):
        assert b["kv_cache_gb"] == pytest.approx(4 * a["kv_cache_gb"])
        assert b["runtime_gb"] == pytest.approx(a["runtime_gb"] + 3 * a["kv_cache_gb"])


def test_an_app_serves_again_after_a_restart_and_refuses_while_closed(artifact):
    """Regression: after one lifespan had ended, the app answered 200 with no tokens (its
    scheduler stayed closed); now a new lifespan serves again, and a closed one says 503."""
    from starlette.testclient import TestClient

    from edgellm.server.app import create_app

    app = create_app(_gen(artifact, "numpy"), "m")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0}
    answers = []
    for _ in range(2):
        with TestClient(app) as c:
            answers.append(c.post("/v1/chat/completions", json=body).json())
    assert [a["usage"]["completion_tokens"] for a in answers] == [4, 4]
    assert answers[0]["choices"] == answers[1]["choices"]
    with TestClient(app) as c:
        app.state.served.close()
        closed = c.post("/v1/chat/completions", json=body)
        assert closed.status_code == 503 and closed.headers["retry-after"] == "1"
        assert closed.json()["error"]["code"] == "shutting_down"


class _LoggedEngine:
    """An engine that records the order of its calls; a decode step can be held at `gate`."""

    slots, prefill_len, kv_cache_len = 4, 128, 1024

    def __init__(self):
        self.calls, self.gate = [], threading.Event()
        self.gate.set()

    def decode_rows(self, first, tokens, positions):
        self.gate.wait(10)
        self.calls.append("step")
        return np.zeros((len(tokens), 8), np.float32)

    def forward(self, tokens, pos, all_logits=False, slot=0):
        self.calls.append(f"prefill {slot}")
        return np.zeros(8, np.float32)


def _decoding(batcher, slot: int, stop: threading.Event) -> threading.Thread:
    def loop():
        pos = 0
        while not stop.is_set():
            batcher.step(slot, 1, pos)
            pos += 1
        batcher.release(slot)
    t = threading.Thread(target=loop)
    t.start()
    return t


def _wait_until(condition):
    for _ in range(1000):
        if condition():
            return
        threading.Event().wait(0.005)
    raise AssertionError("timed out")


def test_prompts_arriving_together_are_prefilled_before_the_next_decode_step():
    """runtime.batch's prefill policy: short prompts waiting for the engine all run before the
    decoding slots' next step (up to prefill_budget tokens): their first tokens come sooner.
    Before, each prompt waited for a decode step of the others after the one before it."""
    from edgellm.runtime.batch import Batcher

    engine = _LoggedEngine()
    batcher, stop = Batcher(engine, max_wait=1.0), threading.Event()
    engine.gate.clear()  # slot 0's first step holds the engine while two prompts arrive
    decoder = _decoding(batcher, 0, stop)
    _wait_until(lambda: batcher.running)
    prompts = [threading.Thread(target=batcher.forward_many, args=(s, [5] * 10, 0, False))
               for s in (1, 2)]
    for t in prompts:
        t.start()
    _wait_until(lambda: len(batcher.prefilling) == 2)
    engine.gate.set()
    for t in prompts:
        t.join()
    stop.set()
    decoder.join()
    first = engine.calls.index("step")
    assert sorted(engine.calls[first + 1:first + 3]) == ["prefill 1", "prefill 2"], engine.calls


def _long_prompt(budget: int | None, max_wait: float = 1.0, gap: float = 0.02) -> list[str]:
    """The engine's calls while slot 1 prefills three 128-token chunks as one prompt (as
    Generator.prefill does) and slot 0 decodes."""
    from edgellm.runtime.batch import Batcher

    engine = _LoggedEngine()
    batcher = Batcher(engine, max_wait=max_wait, prefill_budget=budget)
    stop = threading.Event()
    decoder = _decoding(batcher, 0, stop)
    _wait_until(lambda: "step" in engine.calls)
    with batcher.prefill(1):
        for chunk in range(3):
            batcher.forward_many(1, [5] * 128, 128 * chunk, False)
            time.sleep(gap)  # the generator's own work between two chunks
    stop.set()
    decoder.join()
    return engine.calls[engine.calls.index("prefill 1"):]


def test_a_long_prompt_gives_the_decoding_slots_a_step_between_its_chunks():
    """...and a prompt of several chunks does not stop the others: past the budget (one chunk
    by default) the decoding slot gets a step before the next chunk."""
    calls = _long_prompt(None)
    chunks = [i for i, c in enumerate(calls) if c == "prefill 1"]
    assert len(chunks) == 3
    assert all("step" in calls[a:b] for a, b in zip(chunks, chunks[1:])), calls


def test_fast_chunks_still_let_a_waiting_step_run_between_them():
    """Regression (a CI run): with chunks faster than a waiting step's poll, the next chunk
    gave up waiting for the decoding slots after max_wait and went first; now a chunk past the
    budget runs the step that is waiting itself."""
    calls = _long_prompt(None, max_wait=0.03, gap=0.0)
    chunks = [i for i, c in enumerate(calls) if c == "prefill 1"]
    assert all("step" in calls[a:b] for a, b in zip(chunks, chunks[1:])), calls


def test_the_prefill_budget_spans_the_chunks_of_one_prompt():
    """serve --prefill-budget 256: two chunks of one prompt run back to back (the decoding slot
    does not slip a step in between, though each chunk is its own engine call), then a step."""
    calls = _long_prompt(256)
    assert calls[:4] == ["prefill 1", "prefill 1", "step", "prefill 1"], calls


def test_serve_takes_the_prefill_budget(artifact):
    from edgellm.server.app import create_app

    served = create_app(_gen(artifact, "numpy", slots=2), "m", prefill_budget=256).state.served
    assert served.batcher.prefill_budget == 256
    default = create_app(_gen(artifact, "numpy", slots=2), "m").state.served
    assert default.batcher.prefill_budget == default.gen.engine.prefill_len
    bad = edgellm("serve", artifact, "--prefill-budget", "0")
    assert bad.returncode == 2 and "--prefill-budget: 0 is not at least 1" in bad.stderr


def test_prompts_ending_in_a_one_token_chunk_do_not_wait_for_each_other():
    """Regression (a soak of the server hung): a prompt whose last chunk is one token (all of
    it, after a prefix-cache hit) asks for it as a decode step while inside its prefill; such
    slots waited for their own prefill turn forever."""
    from edgellm.runtime.batch import Batcher

    engine = _LoggedEngine()
    batcher = Batcher(engine, max_wait=0.05)

    def prompt(slot):
        with batcher.prefill(slot):
            batcher.step(slot, 5, 40)
        batcher.release(slot)

    threads = [threading.Thread(target=prompt, args=(s,), daemon=True) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), engine.calls
    assert engine.calls.count("step") >= 1
