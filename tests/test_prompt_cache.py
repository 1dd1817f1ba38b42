"""Prompt K/V kept on disk and reused after a restart (issue 30, part 1): reuse, equality with a
cold run, damaged / truncated / foreign / stale files ignored, the size bound, two writers of one
prefix, a full disk."""

from __future__ import annotations

import errno
import json
import os
import struct

import numpy as np
import pytest

from edgellm.runtime import prompt_store as ps
from edgellm.runtime.generator import Generator
from edgellm.runtime.prefix_cache import PrefixCache
from edgellm.runtime.sampler import SamplingConfig
from edgellm.server.metrics import parse
from helpers import edgellm, make_tiny_model, said, serve_process

SYSTEM = list(range(3, 83))  # an 80-token "system prompt"


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("promptcache")
    make_tiny_model(tmp / "hf", "qwen2", tied=False)
    done = edgellm("build", tmp / "hf", "-o", tmp / "art", "--kv-cache-len", "256",
                   "--prefill-len", "32")
    assert done.returncode == 0, done.stderr
    return tmp / "art"


def _cache(gen, directory, **opts):
    opts.setdefault("min_tokens", 16)
    return PrefixCache(gen, slots=0, store=ps.PromptStore(directory, ps.identity(gen), **opts))


def _answer(gen, cache, ids, n=6):
    if cache is not None:
        cache.prepare(ids)
    result = gen.generate(ids, SamplingConfig(), n, reuse_cache=cache is not None)
    if cache is not None:
        cache.remember(ids)
        cache.flush()
    return result


@pytest.mark.parametrize("engine", ["numpy", "ort"])
def test_a_restart_reuses_the_prefix_from_disk_and_answers_as_a_cold_run(art, tmp_path, engine):
    first = Generator.load(art, engine=engine, threads=1)
    cache = _cache(first, tmp_path / "pc")
    _answer(first, cache, SYSTEM + [90, 91, 92])
    files = list((tmp_path / "pc").glob("*/*.kv"))
    assert len(files) == 1  # the whole first prompt (but its last token)
    # a new process: new engine, new store over the same directory
    gen = Generator.load(art, engine=engine, threads=1)
    cache = _cache(gen, tmp_path / "pc")
    ids = SYSTEM + [100, 101, 102, 103]
    warm = _answer(gen, cache, ids)
    assert cache.disk_hits == 1 and warm.reused_tokens == len(SYSTEM)
    cold = Generator.load(art, engine=engine, threads=1).generate(ids, SamplingConfig(), 6)
    assert warm.token_ids == cold.token_ids
    # the shared part (the system prompt), now seen twice, is stored on its own
    stored = sorted(len(v) for v in cache.store.index.values())
    assert stored == [len(SYSTEM), len(SYSTEM) + 2]
    # the K/V restored are, bit for bit, the ones the first process computed
    for a, b in zip(gen.engine.kv_snapshot(len(SYSTEM)), first.engine.kv_snapshot(len(SYSTEM))):
        np.testing.assert_array_equal(a, b)


def _one_file(art, tmp_path):
    gen = Generator.load(art, engine="numpy")
    _answer(gen, _cache(gen, tmp_path / "pc"), SYSTEM + [90])
    (path,) = (tmp_path / "pc").glob("*/*.kv")
    return path


def _flip_payload(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _other_identity(path):
    data = path.read_bytes()
    size = struct.unpack("<I", data[len(ps.MAGIC):len(ps.MAGIC) + 4])[0]
    start = len(ps.MAGIC) + 4
    header = json.loads(data[start:start + size])
    header["identity"] = "0" * 32
    new = json.dumps(header).encode()
    path.write_bytes(data[:len(ps.MAGIC)] + struct.pack("<I", len(new)) + new
                     + data[start + size:])


def _stale(path):
    data = path.read_bytes().replace(b'"version": 1', b'"version": 0', 1)
    path.write_bytes(data)


@pytest.mark.parametrize("damage,warning", [
    (_flip_payload, "is damaged (checksum)"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "is truncated"),
    (lambda p: p.write_bytes(b"garbage"), "is not a prompt cache file"),
    (_other_identity, "was made for another artifact or engine"),
    (_stale, "has format version 0"),
])
def test_a_bad_file_is_ignored_with_one_warning_removed_and_the_answer_is_right(
        art, tmp_path, capfd, damage, warning):
    path = _one_file(art, tmp_path)
    damage(path)
    capfd.readouterr()
    gen = Generator.load(art, engine="numpy")
    cache = _cache(gen, tmp_path / "pc")
    ids = SYSTEM + [100, 101]
    warm = _answer(gen, cache, ids)
    err = capfd.readouterr().err
    assert err.count("edgellm: warning: prompt cache file") == 1 and warning in err, err
    assert cache.disk_hits == 0 and warm.reused_tokens == 0
    cold = Generator.load(art, engine="numpy").generate(ids, SamplingConfig(), 6)
    assert warm.token_ids == cold.token_ids
    assert not path.exists() or ps.PromptStore(tmp_path / "pc", ps.identity(gen)).has(
        SYSTEM + [100])  # removed (a new file may hold this request's prompt)


def test_the_size_bound_evicts_the_least_recently_used(art, tmp_path):
    gen = Generator.load(art, engine="numpy")
    one = _one_file(art, tmp_path).stat().st_size
    store = ps.PromptStore(tmp_path / "pc", ps.identity(gen), max_bytes=int(one * 2.5),
                           min_tokens=16)
    first = list(store.index)[0]
    os.utime(store.dir / first, (1, 1))  # the oldest
    for i in range(2):
        ids = [200 + i] + SYSTEM
        gen.engine.forward(ids, 0)
        assert store.save(ids, gen.engine.kv_snapshot(len(ids)))
    assert len(store.index) == 2 and first not in store.index
    assert not (store.dir / first).exists()
    assert sum(p.stat().st_size for p in store.dir.glob("*.kv")) <= one * 2.5


def test_two_writers_of_one_prefix_leave_one_good_file(art, tmp_path):
    import threading

    gen = Generator.load(art, engine="numpy")
    gen.engine.forward(SYSTEM, 0)
    kv = gen.engine.kv_snapshot(len(SYSTEM))
    stores = [ps.PromptStore(tmp_path / "pc", ps.identity(gen), min_tokens=16)
              for _ in range(2)]
    threads = [threading.Thread(target=s.save, args=(SYSTEM, kv)) for s in stores for _ in
               range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = list((tmp_path / "pc").rglob("*"))
    kv_files = [f for f in files if f.suffix == ".kv"]
    assert len(kv_files) == 1 and not [f for f in files if f.name.endswith(".tmp")]
    fresh = ps.PromptStore(tmp_path / "pc", ps.identity(gen), min_tokens=16)
    k, v = fresh.load(kv_files[0].name, len(SYSTEM), axis=1)
    np.testing.assert_array_equal(k, kv[0])


def test_a_full_disk_leaves_nothing_half_written_and_the_request_answers(art, tmp_path,
                                                                         monkeypatch, capfd):
    gen = Generator.load(art, engine="numpy")
    cache = _cache(gen, tmp_path / "pc")
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    ids = SYSTEM + [90]
    result = _answer(gen, cache, ids)
    monkeypatch.setattr(os, "fsync", real)
    assert result.token_ids == Generator.load(art, engine="numpy").generate(
        ids, SamplingConfig(), 6).token_ids
    assert not list((tmp_path / "pc").rglob("*.kv")) and not list((tmp_path / "pc").rglob(
        ".*.tmp"))
    assert "No space left on device" in capfd.readouterr().err


def test_the_directory_is_owner_only_and_holds_ids_and_kv_only(art, tmp_path):
    path = _one_file(art, tmp_path)
    assert (tmp_path / "pc").stat().st_mode & 0o777 == 0o700
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    data = path.read_bytes()
    size = struct.unpack("<I", data[len(ps.MAGIC):len(ps.MAGIC) + 4])[0]
    header = json.loads(data[len(ps.MAGIC) + 4:len(ps.MAGIC) + 4 + size])
    assert set(header) == {"version", "identity", "ids", "dtype", "k_shape", "v_shape",
                           "payload_bytes", "sha256"}


def test_run_with_a_prompt_cache_reuses_it_in_the_next_process(art, tmp_path):
    system = "You control a home. " + " ".join(f"lamp{i} is off." for i in range(12))
    runs = [edgellm("run", art, "-p", question, "--system", system, "--json",
                    "--max-new-tokens", "3", "--prompt-cache", tmp_path / "pc")
            for question in ("turn on lamp3", "turn off lamp7")]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    first, second = (json.loads(r.stdout) for r in runs)
    assert first["reused_tokens"] == 0 and second["reused_tokens"] > 60
    done = edgellm("run", art, "-p", "x", "--prompt-cache", "/proc/nope")
    assert done.returncode == 1 and done.stderr.startswith("edgellm: error: --prompt-cache")


@pytest.mark.parametrize("parallel", [1, 2])
def test_serve_reuses_the_prompt_cache_after_a_restart(art, tmp_path, parallel):
    """Two servers one after the other over one --prompt-cache directory (a restart): the
    second's first request takes the shared system prompt from disk (/metrics counts it), and
    its answer is the one a server without the cache gives."""
    import httpx

    from edgellm.server.app import create_app
    from edgellm.runtime.prompt_store import open_store
    from helpers import start_server

    system = "You control a home. " + " ".join(f"lamp{i} is off." for i in range(12))

    def ask(url, question):
        body = {"model": "m", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": question}]}
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()

    def metric(url, name):
        return parse(httpx.get(url + "/metrics", timeout=10).text)[name]

    answers = []
    for store in (True, True, False):
        gen = Generator.load(art, threads=1, slots=parallel)
        prompt_store = open_store(gen, tmp_path / "pc", 1 << 30) if store else None
        server, thread, url = start_server(create_app(gen, "m", prompt_store=prompt_store))
        try:
            question = "turn on lamp3" if not answers else "turn on lamp9"
            answers.append(ask(url, question)["choices"][0]["message"]["content"])
            if store:
                for slot in server.config.app.state.served.slots:  # the writes done
                    slot.prefix_cache.flush()
                hits = metric(url, "edgellm_prompt_cache_disk_hits_total")
                assert hits == (0 if len(answers) == 1 else 1), answers
                assert metric(url, "edgellm_prompt_cache_files") >= 1
        finally:
            server.should_exit = True
            thread.join()
    assert answers[1] == answers[2]  # from disk, as without the cache


def test_a_real_serve_process_restarted_takes_the_prefix_from_disk(art, tmp_path):
    """Issue 42: what a hub does, a real `serve` process stopped (SIGINT) right after a request
    and started again over the same --prompt-cache directory: the new process's first
    request prefills only what follows the stored prefix (/metrics: prompt tokens less those
    reused), and answers as the first process did."""
    import re
    import signal

    import httpx

    system = "You control a home. " + " ".join(f"lamp{i} is off." for i in range(12))
    seen = []
    for run in range(3):
        proc, out = serve_process(art, "--port", "0", "--threads", "1", "--parallel", "2",
                                  "--prompt-cache", tmp_path / "pc")
        try:
            url = re.search(r"OpenAI API  (http://\S+)/v1", "".join(out)).group(1)
            body = {"model": "art", "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": "turn on lamp3"}]}
            answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
            assert "usage" in answer, answer
            metrics = parse(httpx.get(url + "/metrics", timeout=10).text)
        finally:
            proc.send_signal(signal.SIGINT)  # at once: the write must still reach the disk
            assert proc.wait(60) == 0
        prompt = answer["usage"]["prompt_tokens"]
        prefilled = prompt - metrics["edgellm_prefix_cache_reused_tokens_total"]
        seen.append((answer["choices"][0]["message"], prefilled,
                     metrics["edgellm_prompt_cache_disk_hits_total"]))
    (first, cold, hits), *restarts = seen
    assert hits == 0 and cold == prompt > 100
    for message, prefilled, hits in restarts:
        assert hits == 1 and prefilled == 1  # the last prompt token always runs
        assert message == first


def test_serve_warm_prefills_at_start_and_reads_it_back_after_a_restart(art, tmp_path):
    import re
    import signal

    system = "You control a home. " + " ".join(f"lamp{i} is off." for i in range(12))
    (tmp_path / "system.txt").write_text(system)
    (tmp_path / "request.json").write_text(json.dumps({"messages": [
        {"role": "system", "content": system}, {"role": "user", "content": "hi"}]}))
    lines = []
    for _ in range(2):
        proc, out = serve_process(art, "--port", "0", "--threads", "1", "--warm",
                                  tmp_path / "system.txt", "--warm", tmp_path / "request.json",
                                  "--prompt-cache", tmp_path / "pc")
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        lines.append([w for w in out if "warmed" in w])
    counts = [[tuple(map(int, re.search(r": (\d+) tokens \((\d+) read", w).groups()))
               for w in run] for run in lines]
    from edgellm.runtime.cache_reuse import common_prefix
    from edgellm.server.serving import warm_ids

    gen = Generator.load(art, engine="numpy")
    shared = common_prefix(*(warm_ids(gen, tmp_path / f) for f in ("system.txt", "request.json")))
    (n1, read1), (n2, read2) = counts[0]
    assert read1 == 0 and n2 > n1 and read2 == shared > 100  # the second shares the system
    assert [read for _, read in counts[1]] == [n1, n2]  # after the restart: all from disk
    (tmp_path / "bad.json").write_text('{"messages": []}')
    done = edgellm("serve", art, "--port", "0", "--warm", tmp_path / "bad.json")
    (line,) = said(done.stderr)  # before the model loads: nothing else said
    assert done.returncode == 1 and line.startswith("edgellm: error: --warm")
