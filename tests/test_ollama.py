"""The Ollama API (issue 31) through the official `ollama` client: every route a home hub's
integration calls, errors in Ollama's shape and codes, and the same answers as the OpenAI route
(both are the same scheduler task)."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from edgellm.runtime.generator import Generator
from edgellm.server.app import create_app
from helpers import assert_idle, edgellm, make_tiny_model, start_server

TOOLS = [{"type": "function", "function": {
    "name": "HassTurnOn", "description": "Turn on a device or an entity",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}},
                   "required": ["name"]}}}]
GREEDY = {"temperature": 0, "num_predict": 6, "repeat_penalty": 1.0}  # (Ollama: 1.1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ollama")
    make_tiny_model(tmp / "hf", "qwen2", tied=False, max_position_embeddings=4096)
    done = edgellm("build", tmp / "hf", "-o", tmp / "art", "--kv-cache-len", "1024",
                   "--prefill-len", "64")
    assert done.returncode == 0, done.stderr
    return tmp / "art"


@pytest.fixture(scope="module")
def served(tiny):
    gen = Generator.load(tiny, threads=1)
    app = create_app(gen, "tiny", max_body=64 * 1024)
    server, thread, url = start_server(app)
    yield url, gen, app
    server.should_exit = True
    thread.join()


@pytest.fixture
def client(served):
    return ollama.Client(host=served[0])


def test_the_model_is_listed_shown_loaded_and_pulled(client, served):
    (model,) = client.list().models
    assert model.model == "tiny:latest" and model.size > 0 and len(model.digest) == 64
    assert model.details.family == "qwen2" and model.details.quantization_level == "s8"
    show = client.show("tiny")
    assert show.modelinfo["qwen2.context_length"] == 1024
    assert show.template == served[1].template.source and "completion" in show.capabilities
    (running,) = client.ps().models
    assert running.model == "tiny:latest" and running.context_length == 1024
    assert [p.status for p in client.pull("tiny:latest", stream=True)][-1] == "success"
    assert client.pull("tiny").status == "success"
    version = httpx.get(served[0] + "/api/version").json()["version"]
    assert version == __import__("edgellm").__version__


def test_chat_answers_as_the_openai_route_streamed_or_not(client, served):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello there"}]
    whole = client.chat("tiny", messages=messages, options=GREEDY, stream=False)
    parts = list(client.chat("tiny:latest", messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert whole.done_reason in ("stop", "length") and whole.eval_count >= 1
    openai = httpx.post(served[0] + "/v1/chat/completions", json={
        "model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 6}).json()
    assert openai["choices"][0]["message"]["content"] == whole.message.content
    assert whole.prompt_eval_count == openai["usage"]["prompt_tokens"]
    assert whole.eval_count == openai["usage"]["completion_tokens"]
    for field in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert getattr(whole, field) > 0
    # num_predict bounds the answer; Ollama's "until the context is full" (-1) is accepted
    assert client.chat("tiny", messages=messages, options={"temperature": 0, "num_predict": 1}
                       ).eval_count == 1
    assert client.chat("tiny", messages=messages, options={"temperature": 0, "num_predict": -1,
                                                          "stop": ["x"]}).done


def test_generate_is_a_user_message_with_an_optional_system(client, served):
    got = client.generate("tiny", prompt="hello there", system="Be brief.", options=GREEDY)
    chat = client.chat("tiny", messages=[{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "hello there"}],
                       options=GREEDY)
    assert got.response == chat.message.content and got.done
    streamed = list(client.generate("tiny", prompt="hello there", system="Be brief.",
                                    options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == got.response
    assert client.generate("tiny").done_reason == "load"  # no prompt: Ollama's load


def test_format_json_and_a_schema_hold_the_answer_to_json(client):
    for fmt in ("json", {"type": "object", "properties": {"n": {"type": "integer"}},
                         "required": ["n"]}):
        reply = client.chat("tiny", messages=[{"role": "user", "content": "a number"}],
                            format=fmt, options={"temperature": 0, "num_predict": 40,
                                                 "seed": 3})
        if reply.done_reason == "stop":
            value = json.loads(reply.message.content)
            assert isinstance(value, dict) and (fmt == "json" or isinstance(value["n"], int))
        else:  # cut by num_predict: still a JSON prefix
            assert reply.message.content.lstrip().startswith("{")


def test_history_with_tool_calls_and_results_renders_as_openai_does(client, served):
    """Assistant tool_calls with object arguments and tool results (tool_name) in the history:
    the same prompt as the OpenAI route's history with string arguments."""
    ollama_history = [
        {"role": "user", "content": "turn on the lamp"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "HassTurnOn", "arguments": {"name": "lamp"}}}]},
        {"role": "tool", "content": "done", "tool_name": "HassTurnOn"}]
    ours = client.chat("tiny", messages=ollama_history, tools=TOOLS, options=GREEDY)
    openai_history = [
        {"role": "user", "content": "turn on the lamp"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_2_0", "type": "function",
             "function": {"name": "HassTurnOn", "arguments": json.dumps({"name": "lamp"})}}]},
        {"role": "tool", "content": "done", "name": "HassTurnOn"}]
    theirs = httpx.post(served[0] + "/v1/chat/completions", json={
        "model": "tiny", "messages": openai_history, "tools": TOOLS, "temperature": 0,
        "max_tokens": 6}).json()
    assert ours.prompt_eval_count == theirs["usage"]["prompt_tokens"]


@pytest.mark.parametrize("call,status,words", [
    (lambda c: c.chat("gpt-9", messages=[{"role": "user", "content": "hi"}]), 404,
     "'gpt-9' not found; this server serves 'tiny:latest'"),
    (lambda c: c.chat("tiny:7b", messages=[{"role": "user", "content": "hi"}]), 404,
     "tiny:7b"),
    (lambda c: c.pull("other"), 404, "serves 'tiny:latest'"),
    (lambda c: c.show("other"), 404, "other"),
    (lambda c: c.embed("tiny", input="hi"), 501, "embeddings are not available"),
    (lambda c: c.generate("tiny", prompt="hi", raw=True), 400, "raw is not supported"),
    (lambda c: c.generate("tiny", prompt="hi", template="{{ .Prompt }}"), 400, "template"),
    (lambda c: c.chat("tiny", messages=[{"role": "user", "content": "hi", "images": ["aGk="]}]),
     400, "text only"),
    (lambda c: c.chat("tiny", messages=[{"role": "user", "content": "hi"}], think=True), 400,
     "does not support thinking"),
    (lambda c: c.chat("tiny", messages=[{"role": "user", "content": "word " * 1200}]), 400,
     "--ctx-size"),
])
def test_errors_come_in_ollamas_shape_and_codes(client, served, call, status, words):
    with pytest.raises(ollama.ResponseError) as e:
        result = call(client)
        list(result) if hasattr(result, "__next__") else result
    assert e.value.status_code == status and words in e.value.error
    assert client.chat("tiny", messages=[{"role": "user", "content": "hi"}],
                       options={"num_predict": 1}).done  # still serving


@pytest.mark.parametrize("body,words", [
    (b"{not json", "invalid JSON"), (b"[1]", "JSON object"),
    (json.dumps({"model": "tiny", "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                 "options": {"temperature": -1}}).encode(), "temperature"),
    (json.dumps({"messages": []}).encode(), "model"),
    # a lone surrogate (the fuzz suite's find: its 404 message could not be encoded, a 500)
    (b'{"model": "\\ud800", "messages": []}', "lone UTF-16 surrogate"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
     "messages.0.content"),
])
def test_bad_bodies_are_400s_with_an_error_string(served, body, words):
    reply = httpx.post(served[0] + "/api/chat", content=body,
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and words in reply.json()["error"]
    assert set(reply.json()) == {"error"}


def test_the_key_and_the_body_limit_guard_the_ollama_routes(tiny, served):
    gen = served[1]
    server, thread, url = start_server(create_app(gen, "tiny", api_key="sesame",
                                                  max_body=1024))
    try:
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=url).list()
        assert e.value.status_code == 401 and "API key" in e.value.error
        keyed = ollama.Client(host=url, headers={"Authorization": "Bearer sesame"})
        assert keyed.list().models
        with pytest.raises(ollama.ResponseError) as e:
            keyed.chat("tiny", messages=[{"role": "user", "content": "x" * 2000}])
        assert e.value.status_code == 413
    finally:
        server.should_exit = True
        thread.join()


def test_a_full_queue_is_a_429_with_retry_after(client, served):
    scheduler = served[2].state.served
    scheduler.pending = scheduler.max_queue + 1  # as if that many requests were in line
    try:
        reply = httpx.post(served[0] + "/api/chat", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
        assert set(reply.json()) == {"error"}
    finally:
        scheduler.pending = 0


@pytest.mark.slow
def test_a_home_hubs_conversation_replayed(qwen_s8):
    """Qwen2.5-Coder-0.5B s8, as a hub's Ollama integration drives it: list, show, ps, then a
    streamed chat with its intent tools and a system prompt listing devices (num_ctx and
    keep_alive as the hub sends them) -> a call with object arguments -> the tool's result ->
    a text answer; the same call whole; a schema-formatted answer that validates."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from prompt_cache import hub_prompt

    gen = Generator.load(qwen_s8, threads=2, ctx_size=2048)
    server, thread, url = start_server(create_app(gen, "qwen"))
    try:
        client = ollama.Client(host=url)
        assert [m.model for m in client.list().models] == ["qwen:latest"]
        assert "tools" in client.show("qwen:latest").capabilities
        assert client.ps().models[0].context_length == 2048
        system, tools = hub_prompt(12)
        options = {"temperature": 0, "num_ctx": 8192}
        history = [{"role": "system", "content": system},
                   {"role": "user", "content": "Turn on the kitchen light 0."}]
        parts = list(client.chat("qwen:latest", messages=history, tools=tools, stream=True,
                                 options=options, keep_alive="5m"))
        (call,) = [c for p in parts for c in p.message.tool_calls or []]
        assert call.function.name == "HassTurnOn"
        assert call.function.arguments["name"] == "Kitchen light 0"  # an object, not a string
        assert parts[-1].done and parts[-1].done_reason == "stop"
        whole = client.chat("qwen", messages=history, tools=tools, options=options)
        assert [c.function for c in whole.message.tool_calls] == [call.function]
        history += [{"role": "assistant", "content": "",
                     "tool_calls": [{"function": call.function.model_dump()}]},
                    {"role": "tool", "tool_name": "HassTurnOn",
                     "content": json.dumps({"success": True, "targets": ["Kitchen light 0"]})}]
        final = client.chat("qwen", messages=history, tools=tools, options=options)
        assert not final.message.tool_calls and final.message.content.strip()
        schema = {"type": "object", "required": ["city", "population"],
                  "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}}
        answer = json.loads(client.chat("qwen", messages=[
            {"role": "user", "content": "Name a city and its population."}], format=schema,
            options={"temperature": 0}).message.content)
        assert isinstance(answer["city"], str) and isinstance(answer["population"], int)
        assert isinstance(json.loads(client.chat("qwen", messages=[
            {"role": "user", "content": "Describe Paris as JSON."}], format="json",
            options={"temperature": 0, "num_predict": 200}).message.content), dict)
        # a client that leaves mid-stream stops its generation (a long count otherwise)
        scheduler = server.config.app.state.served
        before = scheduler.metrics["completion_tokens_total"]
        body = {"model": "qwen", "messages": [{"role": "user", "content": "Count from 1 to 500."}],
                "options": {"num_predict": 400, "temperature": 0}}
        with httpx.stream("POST", url + "/api/chat", json=body) as reply:
            lines = reply.iter_lines()
            assert not json.loads(next(lines))["done"] and not json.loads(next(lines))["done"]
        assert_idle(scheduler)
        assert scheduler.metrics["completion_tokens_total"] - before < 300
    finally:
        server.should_exit = True
        thread.join()
