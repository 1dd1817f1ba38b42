"""A hostile but fair client, and a damaged disk: no hang, no 500, no silent garbage (issue 15).

A tiny random model whose chat template renders tools, served by a real uvicorn on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from helpers import assert_idle, edgellm, make_tiny_model, said, serve_process, start_server

uvicorn = pytest.importorskip("uvicorn")

MODEL = "tiny"
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HELLO = [{"role": "user", "content": "hello world"}]


def _tiny_source(path):
    make_tiny_model(path, "qwen2", tied=False, scale=3.0, embed_boost=20.0)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template":
                                                                  TOOLS_TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _tiny_source(tmp_path_factory.mktemp("hostile") / "hf")


@pytest.fixture(scope="module")
def artifact(source, tmp_path_factory):
    from edgellm.compiler import BuildOptions, build

    return build(source, tmp_path_factory.mktemp("art") / MODEL,
                 BuildOptions(kv_cache_len=4096, prefill_len=16), quiet=True)


@pytest.fixture(scope="module")
def served(artifact):
    from edgellm.runtime.generator import Generator
    from edgellm.server.app import create_app

    app = create_app(Generator.load(artifact, threads=1), MODEL, max_queue=8,
                     max_body=1 << 20)
    server, thread, url = start_server(app, log_level="error", timeout_graceful_shutdown=2)
    yield url, app.state.served
    server.should_exit = True
    thread.join(10)


def post(url: str, body, timeout: float = 60, path: str = "/v1/chat/completions"):
    """(status, parsed JSON or SSE events) of a POST; `body` a dict or raw bytes/str."""
    data = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str)
                                                 else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, raw, kind = r.status, r.read().decode(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read().decode(), e.headers.get("content-type", "")
    if kind.startswith("text/event-stream"):
        return status, [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    return status, json.loads(raw)


def assert_openai_error(status: int, payload, code: int = 400, *words):
    assert status == code, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}, payload
    for w in words:
        assert w in payload["error"]["message"] or w == payload["error"]["param"], payload


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": HELLO, "max_tokens": 4, **fields}


def assert_still_serving(url):
    status, payload = post(url, chat(max_tokens=2))
    assert status == 200 and payload["choices"][0]["message"]["role"] == "assistant"


# 1 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": 'a"b'}}])
def test_a_tool_name_with_a_quote_is_refused_at_once(served, choice):
    url, _ = served
    tools = [{"type": "function", "function": {"name": 'a"b', "parameters": {"type": "object"}}}]
    status, payload = post(url, chat(tools=tools, tool_choice=choice), timeout=20)
    assert_openai_error(status, payload, 400, "tools.0.function.name")
    assert_still_serving(url)


def test_the_grammar_names_a_missing_tool_instead_of_raising_stop_iteration():
    from edgellm.chat.constrained import _lark_rest_of_call
    from edgellm.errors import EdgeLLMError

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(EdgeLLMError, match="'g'"):
        _lark_rest_of_call('<tool_call>\n{"name": "g", "arguments": ', tools)


def test_sigterm_stops_a_server_in_the_middle_of_a_long_answer(artifact):
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", str(artifact),
                             "--port", "0", "--threads", "1", "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            if "OpenAI API" in line:
                url = line.split()[2].removesuffix("/v1")
                break
        body = chat(max_tokens=4000)  # seconds of decoding: still running when SIGTERM comes
        threading.Thread(target=lambda: post(url, body, timeout=60), daemon=True).start()
        time.sleep(1.0)
        proc.terminate()
        assert proc.wait(20) is not None
    finally:
        proc.kill()


# 2 ------------------------------------------------------------------------------------------

def _damaged_copy(artifact, tmp_path, keep_samples: bool = True):
    """A copy whose lm_head's norm is NaN (what random bytes make of it), same size."""
    from edgellm.artifact.reader import load_artifact

    copy = tmp_path / "damaged"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    norm = manifest["files"]["post.bin"]["tensors"]["output_norm"]
    with open(copy / "post.bin", "r+b") as f:
        f.seek(norm["offset"])
        f.write(np.full(norm["shape"], np.nan, np.float32).tobytes())
    if not keep_samples:  # as an artifact built before sampled checksums: only NaN tells
        for entry in manifest["files"].values():
            entry.pop("sample_sha256", None)
        (copy / "manifest.json").write_text(json.dumps(manifest))
    load_artifact(copy)  # sizes still match
    return copy


def test_a_damaged_file_is_caught_at_load(artifact, tmp_path):
    from edgellm.artifact.reader import load_artifact
    from edgellm.errors import EdgeLLMError

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    post_bin = copy / "post.bin"
    post_bin.write_bytes(np.random.default_rng(0).bytes(post_bin.stat().st_size))
    with pytest.raises(EdgeLLMError, match="damaged"):
        load_artifact(copy)
    done = edgellm("run", copy, "-p", "hi")
    assert done.returncode == 1 and done.stderr.startswith("edgellm: error: ")
    assert "post.bin" in done.stderr and done.stderr.count("\n") == 1


def test_nan_logits_stop_generation_with_a_clear_error(artifact, tmp_path):
    copy = _damaged_copy(artifact, tmp_path, keep_samples=False)
    done = edgellm("run", copy, "-p", "hi", "--max-new-tokens", "4")
    assert done.returncode == 1, done.stdout
    assert done.stderr.startswith("edgellm: error: the model computed non-finite logits")
    assert f"edgellm inspect {copy} --verify" in done.stderr
    assert edgellm("inspect", copy, "--verify").returncode == 1


def test_serve_verify_refuses_a_damaged_artifact(artifact, tmp_path):
    copy = _damaged_copy(artifact, tmp_path, keep_samples=False)
    done = edgellm("serve", copy, "--port", "0", "--verify")
    assert done.returncode == 1
    assert "does not match its sha256" in done.stderr and len(said(done.stderr)) == 1


def test_a_damaged_model_answers_an_error_not_garbage(artifact, tmp_path):
    from edgellm.runtime.generator import Generator
    from edgellm.server.app import create_app

    copy = _damaged_copy(artifact, tmp_path, keep_samples=False)
    server, thread, url = start_server(create_app(Generator.load(copy, threads=1), MODEL),
                                        log_level="error", timeout_graceful_shutdown=2)
    try:
        status, payload = post(url, chat())
        assert_openai_error(status, payload, 500, "non-finite logits")
        assert payload["error"]["type"] == "server_error"
        status, events = post(url, chat(stream=True))  # 4: after the headers, an error event
        assert status == 200 and "error" in json.loads(events[-1]), events
        assert "non-finite logits" in json.loads(events[-1])["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(10)


# 3, 4, 9 ------------------------------------------------------------------------------------

LONE = '"hi \\ud800"'  # JSON for a string with a lone surrogate
REFUSED = [
    ('{"model": "tiny", "messages": [{"role": "user", "content": %s}]}' % LONE, "surrogate"),
    ('{"model": "tiny", "stream": true, "messages": [{"role": "user", "content": %s}]}' % LONE,
     "surrogate"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
     "text"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_k": 1e999}',
     "top_k"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_k": -1}', "top_k"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
     '"repetition_penalty": NaN}', "repetition_penalty"),
    ('{"model": "tiny", "stream": true, "messages": [{"role": "user", "content": "hi"}], '
     '"repetition_penalty": NaN}', "repetition_penalty"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "finite"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": '
     '"function", "function": {"name": "f"}}], "tool_choice": {"type": "function", '
     '"function": "f"}}', "tool_choice"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", '
     '"image_url": {"url": "http://x/y.png"}}]}]}', "image_url"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": '
     '"function", "function": {"name": "f", "parameters": {"type": 5}}}], "tool_choice": '
     '"auto"}', "parameters"),
]


@pytest.mark.parametrize("body,words", REFUSED, ids=[f"refused{i}" for i in range(len(REFUSED))])
def test_bad_bodies_get_a_400_in_the_openai_shape(served, body, words):
    url, _ = served
    status, payload = post(url, body)
    assert_openai_error(status, payload, 400)
    assert words in json.dumps(payload["error"]), payload
    assert "less than or equal" not in payload["error"]["message"]


def test_a_lone_surrogate_in_a_completion_prompt_is_a_400(served):
    url, _ = served
    status, payload = post(url, '{"model": "tiny", "prompt": %s}' % LONE, path="/v1/completions")
    assert_openai_error(status, payload, 400, "surrogate")


def test_a_negative_seed_is_a_seed(served):
    url, _ = served
    answers = [post(url, chat(seed=-1, temperature=1.0, max_tokens=6)) for _ in range(2)]
    assert [a[0] for a in answers] == [200, 200]
    assert answers[0][1]["choices"][0]["message"] == answers[1][1]["choices"][0]["message"]
    status, events = post(url, chat(seed=-1, stream=True))
    assert status == 200 and events[-1] == "[DONE]"


def test_a_recursive_schema_under_required_is_not_a_500(served):
    url, _ = served
    schema = {"type": "object", "properties": {"node": {"$ref": "#/$defs/node"}},
              "$defs": {"node": {"type": "object",
                                 "properties": {"next": {"$ref": "#/$defs/node"}}}}}
    tools = [{"type": "function", "function": {"name": "walk", "parameters": schema}}]
    status, payload = post(url, chat(tools=tools, tool_choice="required", max_tokens=8))
    assert status in (200, 400), payload
    if status == 400:
        assert_openai_error(status, payload, 400)
    assert_still_serving(url)


# 5 ------------------------------------------------------------------------------------------

def test_abandoned_requests_stop_and_free_the_queue(served):
    url, scheduler = served
    before = scheduler.metrics["completion_tokens_total"]
    body = chat(max_tokens=3000)  # each alone decodes for several seconds on this model

    def abandon():
        try:
            post(url, body, timeout=0.5)
        except (TimeoutError, urllib.error.URLError, socket.timeout):
            pass

    clients = [threading.Thread(target=abandon) for _ in range(3)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    start = time.monotonic()
    assert_still_serving(url)  # not behind ~9000 tokens decoded for nobody
    waited = time.monotonic() - start
    assert_idle(scheduler, 5.0)
    generated = scheduler.metrics["completion_tokens_total"] - before
    assert generated < 3000, (generated, waited)


def test_a_cancelled_request_runs_no_prefill(artifact):
    from edgellm.runtime.generator import Generator
    from edgellm.runtime.sampler import SamplingConfig

    gen = Generator.load(artifact, threads=1)
    calls = []
    forward = gen.engine.forward
    gen.engine.forward = lambda *a, **k: calls.append(a) or forward(*a, **k)
    ids = gen.encode_chat([{"role": "user", "content": "hello world " * 20}])  # several chunks
    result = gen.generate(ids, SamplingConfig(), 8, cancelled=lambda: True)
    assert result.stop_reason == "cancelled" and result.token_ids == [] and calls == []
    checks = iter([False, False, True])  # cancelled after the second chunk
    result = gen.generate(ids, SamplingConfig(), 8, cancelled=lambda: next(checks, True))
    assert result.stop_reason == "cancelled" and len(calls) == 2
    assert len(gen.cached_ids) == 2 * gen.engine.prefill_len  # what the cache holds, exactly


# 6 ------------------------------------------------------------------------------------------

def test_a_chunked_upload_is_refused_while_it_comes(served):
    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(24):  # 1.5 MB of a body that never ends: the answer must not wait for it
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert_still_serving(url)


# 7, 8 ---------------------------------------------------------------------------------------

def _one_line_error(done, *words):
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("edgellm: error: ") and done.stderr.count("\n") == 1, \
        done.stderr
    for w in words:
        assert w in done.stderr, done.stderr


def _without_samples(path):
    manifest = json.loads((path / "manifest.json").read_text())
    for entry in manifest["files"].values():
        entry.pop("sample_sha256", None)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_damaged_graphs_tokenizers_and_manifests_are_one_line_errors(artifact, tmp_path):
    for name, words in (("layer_000.onnx", ("layer_000.onnx",)),
                        ("tokenizer.json", ("tokenizer",))):
        copy = tmp_path / name
        shutil.copytree(artifact, copy)
        size = (copy / name).stat().st_size
        (copy / name).write_bytes(b"\x07" * size)
        _one_line_error(edgellm("run", copy, "-p", "hi"), "damaged")  # the sampled checksum
        _without_samples(copy)
        _one_line_error(edgellm("run", copy, "-p", "hi"), *words)  # and without it
    copy = tmp_path / "config"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"config": {}}))
    _one_line_error(edgellm("run", copy, "-p", "hi"), "model config")
    _one_line_error(edgellm("inspect", copy, "--verify"), "model config")


@pytest.mark.parametrize("config,words", [([1, 2], "not a JSON object"),
                                          (None, "not a JSON object"),
                                          ({"num_hidden_layers": -1}, "num_hidden_layers -1")])
def test_impossible_configs_are_one_line_errors(source, tmp_path, config, words):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    if isinstance(config, dict):
        config = json.loads((src / "config.json").read_text()) | config
    (src / "config.json").write_text(json.dumps(config))
    _one_line_error(edgellm("build", src, "-o", tmp_path / "out"), words)
    assert not (tmp_path / "out").exists()


def test_a_gguf_without_a_vocabulary_is_a_one_line_error(tmp_path):
    import gguf

    path = tmp_path / "novocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _one_line_error(edgellm("build", path, "-o", tmp_path / "out"), "tokenizer.ggml.tokens")


@pytest.mark.parametrize("flags,words", [(["--port", "99999"], "not a TCP port"),
                                         (["--max-queue", "-1"], "negative")])
def test_impossible_serve_flags_are_usage_errors(artifact, flags, words):
    done = edgellm("serve", artifact, *flags)
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr


def test_a_leftover_old_artifact_does_not_block_force(source, tmp_path):
    out = tmp_path / "art"
    assert edgellm("build", source, "-o", out, "--kv-cache-len", "32").returncode == 0
    leftover = tmp_path / ".art.old"  # a kill between the two renames of a --force build
    shutil.copytree(out, leftover)
    done = edgellm("build", source, "-o", out, "--kv-cache-len", "32", "--force")
    assert done.returncode == 0, done.stderr
    assert not leftover.exists() and (out / "manifest.json").is_file()



# a bounded soak ------------------------------------------------------------------------------

def test_a_soak_of_mixed_requests_leaves_the_server_idle_and_well(artifact):
    """benchmarks/soak.py: streams, disconnects, client timeouts and bad bodies from 4 threads;
    then queue depth 0, RSS within 10% of where it settled, a normal request answered."""
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "soak.py"
    done = subprocess.run([sys.executable, str(script), str(artifact), "--requests", "240",
                           "--json"], capture_output=True, text=True, timeout=600)
    report = json.loads(done.stdout)
    assert done.returncode == 0, report
    assert report["failures"] == [] and report["queue_depth_after"] == 0
    assert report["rss_after_mb"] <= 1.1 * report["rss_settled_mb"]
    assert report["final_request"] == [200, "assistant"]
    kinds = report["outcomes"]
    assert kinds.get("200", 0) > 20 and kinds.get("400", 0) > 10 and kinds.get("disconnected")


# a requested stop --------------------------------------------------------------------------

@pytest.mark.parametrize("sig, path", [("SIGTERM", "/v1/chat/completions"),
                                       ("SIGINT", "/api/chat")])
def test_a_stop_mid_stream_ends_streams_with_an_error_and_exits_cleanly(artifact, sig, path):
    """Issue 33, item 2: SIGTERM or Ctrl-C while a stream runs (and a non-streamed request
    waits for its answer): the stream ends with an error event (OpenAI) or error line (Ollama),
    the other request gets a 503 in the API's shape, and the server exits with status 0
    without a traceback (it waited out a 5 s grace period and cancelled tasks, printing one)."""
    import re
    import signal

    proc, banner = serve_process(artifact, "--port", "0", "--threads", "1", "--parallel", "2",
                                 "--quiet")
    try:
        url = re.search(r"(http://\S+?)/v1", "".join(banner)).group(1)
        waiting = {}
        other = threading.Thread(target=lambda: waiting.update(
            answer=post(url, chat(max_tokens=3000, temperature=0), timeout=60)))
        other.start()
        model = MODEL if path.startswith("/v1") else MODEL + ":latest"
        body = json.dumps({"model": model, "messages": HELLO, "stream": True,  # greedy: long
                           **({"max_tokens": 3000, "temperature": 0} if path.startswith("/v1")
                              else {"options": {"num_predict": 3000, "temperature": 0}})}
                          ).encode()
        request = urllib.request.Request(url + path, body, {"Content-Type": "application/json"})
        lines = []
        with urllib.request.urlopen(request, timeout=60) as r:
            for raw in r:
                line = raw.decode().strip()
                if line:
                    lines.append(line)
                if len(lines) == 3:  # answering: stop the server
                    proc.send_signal(getattr(signal, sig))
        other.join(60)
        assert proc.wait(60) == 0
        log = proc.stderr.read()
    finally:
        proc.kill()
    assert "Traceback" not in log and "CancelledError" not in log, log
    last = json.loads(lines[-1].removeprefix("data: "))
    assert "error" in last, lines[-3:]
    message = last["error"]["message"] if path.startswith("/v1") else last["error"]
    assert "shutting down" in message, lines[-3:]
    assert len(lines) < 1000  # stopped, not run to its end
    status, payload = waiting["answer"]
    assert_openai_error(status, payload, 503)
    assert payload["error"]["code"] == "shutting_down"


# what an operator reads --------------------------------------------------------------------

def test_metrics_are_the_prometheus_text_format_and_count_refusals(served):
    """Issue 33, item 8: # HELP and # TYPE for every metric (read by prometheus_client's own
    parser), refusals counted by reason (a prompt over the context was not counted), and the
    mean batch size since start rather than of the last 10 s (0.0 beside 129 steps)."""
    from prometheus_client.parser import text_string_to_metric_families

    from edgellm.server.metrics import METRICS

    url, scheduler = served

    def families():
        with urllib.request.urlopen(url + "/metrics") as r:
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            return {f.name: f for f in text_string_to_metric_families(r.read().decode())}

    before = families()
    status, payload = post(url, chat(messages=[{"role": "user", "content": "hello " * 5000}]))
    assert_openai_error(status, payload, 400, "context")
    after = families()
    assert set(before) == {f"edgellm_{n}".removesuffix("_total") for n in METRICS
                           if not n.startswith("prompt_cache")}  # (no --prompt-cache here)
    for name, family in after.items():
        kind = METRICS[name.removeprefix("edgellm_") + ("_total" if family.type == "counter"
                                                      else "")][0]
        assert family.type == kind and family.documentation, name

    def rejected(fams, reason):
        return next(s.value for s in fams["edgellm_rejected"].samples
                    if s.labels == {"reason": reason} and s.name.endswith("_total"))

    assert rejected(after, "context_length") == rejected(before, "context_length") + 1
    assert rejected(after, "queue_full") == rejected(before, "queue_full")
    assert next(iter(after["edgellm_kv_cache_bytes"].samples)).value > 0


def test_the_request_log_marks_a_stream_the_client_left(artifact):
    import io

    from edgellm.runtime.generator import Generator
    from edgellm.server.app import create_app
    from edgellm.server.request_log import RequestLog

    out = io.StringIO()
    app = create_app(Generator.load(artifact, threads=1), MODEL)
    server, thread, url = start_server(RequestLog(app, out), log_level="error")
    try:
        assert post(url, chat(max_tokens=2))[0] == 200
        body = json.dumps(chat(max_tokens=3000, temperature=0, stream=True)).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            for _ in range(3):
                r.readline()
        assert_idle(app.state.served)  # it noticed, stopped, and logged
        for _ in range(100):
            if len(out.getvalue().splitlines()) >= 2:
                break
            time.sleep(0.05)
    finally:
        server.should_exit = True
        thread.join(10)
    whole, left = out.getvalue().splitlines()[:2]
    assert " 200 " in whole and "cut" not in whole, whole
    assert " 200 cut " in left, left


@pytest.mark.parametrize("key", [None, "sesame"])
def test_a_server_open_to_the_network_says_where_and_warns_without_a_key(artifact, key):
    """Issue 33, item 10: --host 0.0.0.0 printed http://0.0.0.0:PORT (which opens nothing) and
    no word that the API was open to anyone."""
    import signal

    proc, out = serve_process(artifact, "--host", "0.0.0.0", "--port", "0", "--threads", "1",
                              *(["--api-key", key] if key else []))
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    text = "".join(out)
    assert "0.0.0.0" not in text.replace("--host 0.0.0.0", "")
    assert "http://127.0.0.1:" in text
    warned = [line for line in out if line.startswith("edgellm: warning: --host 0.0.0.0")]
    assert len(warned) == (0 if key else 1) and (key or "--api-key" in warned[0])


def test_a_tool_system_prompt_goes_where_tools_come_without_one(artifact):
    """serve --tool-system-prompt (issue 32): the system message of a request that offers tools
    and has none of its own; a request's own system message, or one without tools, is left
    as sent."""
    from edgellm.runtime.generator import Generator
    from edgellm.server.schemas import ChatRequest
    from edgellm.server.steps import encode_chat

    gen = Generator.load(artifact, threads=1)
    tools = [{"type": "function", "function": {"name": "lamp", "parameters": {
        "type": "object", "properties": {}}}}]

    def prompt(messages, with_tools=True):
        req = ChatRequest(model=MODEL, messages=messages, tools=tools if with_tools else None)
        return gen.tokenizer.decode(encode_chat(gen, req, "CALL ONLY WHEN NEEDED")[0])

    assert "system\nCALL ONLY WHEN NEEDED\nuser\nhello world" in prompt(HELLO)
    own = [{"role": "system", "content": "be brief"}, *HELLO]
    assert "CALL ONLY" not in prompt(own) and "be brief" in prompt(own)
    assert "CALL ONLY" not in prompt(HELLO, with_tools=False)
    done = edgellm("serve", artifact, "--port", "0", "--tool-system-prompt", "@/no/such/file")
    (line,) = said(done.stderr)
    assert done.returncode == 1 and line.startswith("edgellm: error: --tool-system-prompt")
