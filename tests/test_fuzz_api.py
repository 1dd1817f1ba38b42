"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis) on a tiny model: no request,
however odd, may produce a server error."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from edgellm.compiler import BuildOptions, build  # noqa: E402
from edgellm.runtime.generator import Generator  # noqa: E402
from edgellm.server.app import create_app  # noqa: E402
from helpers import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    make_tiny_model(tmp / "hf", "qwen2", tied=False)
    art = build(tmp / "hf", tmp / "art", BuildOptions(kv_cache_len=64, prefill_len=16))
    app = create_app(Generator.load(art, threads=1), "tiny", max_body=16 * 1024)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_no_request_makes_a_server_error(case):
    if case.path in ("/api/embed", "/api/embeddings"):  # 501 by design: no embedding output
        response = case.call()
        assert 400 <= response.status_code < 500 or response.status_code == 501, response.text
        assert set(response.json()) == {"error"}
        return
    case.call_and_validate(checks=[not_a_server_error])


# Our own generators, for the shapes a schema-driven fuzzer rarely makes: strings with lone
# surrogates and control characters, non-finite and huge numbers, wrong nesting in content parts
# and tools. Bodies are written as JSON text (NaN and Infinity included, as Python's json does).
from hypothesis import given, strategies as st  # noqa: E402

_text = st.text(st.characters(categories=("L", "N", "P", "Zs", "Cc", "Cs")), max_size=12)
_number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
                    st.sampled_from([0, -1, 1, 2, 0.5, 1e999]))
_junk = st.one_of(st.none(), st.booleans(), _number, _text)
_part = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"])},
                                        optional={"text": st.one_of(_text, _junk),
                                                  "image_url": _junk}),
                  _junk)
_content = st.one_of(_text, st.lists(_part, max_size=3), _junk)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]),
     "content": _content},
    optional={"tool_calls": st.lists(st.dictionaries(_text, _junk, max_size=2), max_size=2),
              "name": _junk})
_schema = st.one_of(st.just({"type": "object"}), st.just({"type": 5}),
                    st.just({"type": "object", "properties": {"x": {"type": "string"}},
                             "required": ["x"]}),
                    st.dictionaries(_text, _junk, max_size=2), _junk)
_tool = st.one_of(st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "retrieval"]),
     "function": st.one_of(st.fixed_dictionaries(
         {"name": st.one_of(st.sampled_from(["f", "get_weather", 'a"b', "", "x" * 70]), _text)},
         optional={"parameters": _schema, "description": _junk}), _junk)}), _junk)
_choice = st.one_of(st.sampled_from(["auto", "none", "required", "any"]),
                    st.fixed_dictionaries({"type": st.just("function"),
                                           "function": st.one_of(
                                               st.fixed_dictionaries({"name": _text}), _text)}),
                    _junk)
_body = st.fixed_dictionaries(
    {"model": st.one_of(st.just("tiny"), _text),
     "messages": st.one_of(st.lists(_message, min_size=1, max_size=3), _junk)},
    optional={"stream": st.one_of(st.booleans(), _junk), "max_tokens": st.integers(-1, 6),
              "temperature": _number, "top_p": _number, "top_k": _number,
              "repetition_penalty": _number, "seed": _number, "stop": st.one_of(_text, _junk),
              "tools": st.one_of(st.lists(_tool, max_size=2), _junk), "tool_choice": _choice,
              "n": _number, "presence_penalty": _number})


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    from starlette.testclient import TestClient

    tmp = tmp_path_factory.mktemp("fuzz-own")
    make_tiny_model(tmp / "hf", "qwen2", tied=False)
    art = build(tmp / "hf", tmp / "art", BuildOptions(kv_cache_len=64, prefill_len=16),
                quiet=True)
    with TestClient(create_app(Generator.load(art, threads=1), "tiny", max_body=16 * 1024),
                    raise_server_exceptions=False) as client:
        yield client


@given(body=_body, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_hostile_bodies_get_no_server_error_and_streams_end_properly(fuzz_client, body, path):
    import json

    if path == "/v1/completions":
        body = {k: v for k, v in body.items() if k != "messages"} | {"prompt": body["messages"]
                                                                     if isinstance(
                                                                         body["messages"], str)
                                                                     else "hello"}
    r = fuzz_client.post(path, content=json.dumps(body), headers={"Content-Type":
                                                                  "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:300], body)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
        assert events and (events[-1] == "[DONE]" or '"error"' in events[-1]), events[-3:]
    else:
        assert "choices" in r.json()


_options = st.fixed_dictionaries({}, optional={
    "temperature": _number, "top_k": _number, "top_p": _number, "seed": _number,
    "num_predict": st.one_of(st.integers(-3, 6), _junk), "stop": st.one_of(_text, _junk),
    "repeat_penalty": _number, "repeat_last_n": st.one_of(st.integers(-2, 70), _junk),
    "num_ctx": _number, "mirostat": _junk})
_ollama_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]),
     "content": st.one_of(_text, _junk)},
    optional={"tool_calls": st.one_of(st.lists(st.fixed_dictionaries({"function": st.one_of(
        st.fixed_dictionaries({"name": _text}, optional={"arguments": st.one_of(
            st.dictionaries(_text, _junk, max_size=2), _junk)}), _junk)}), max_size=2), _junk),
              "tool_name": _junk, "images": st.one_of(st.lists(_text, max_size=1), _junk),
              "thinking": _junk})
_ollama_body = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["tiny", "tiny:latest", "tiny:7b"]), _text)},
    optional={"messages": st.one_of(st.lists(_ollama_message, max_size=3), _junk),
              "prompt": st.one_of(_text, _junk), "system": st.one_of(_text, _junk),
              "raw": st.one_of(st.booleans(), _junk), "stream": st.one_of(st.booleans(), _junk),
              "format": st.one_of(st.just("json"), _schema), "options": st.one_of(_options,
                                                                                 _junk),
              "tools": st.one_of(st.lists(_tool, max_size=2), _junk),
              "think": st.one_of(st.booleans(), _junk), "keep_alive": _junk})


@given(body=_ollama_body, path=st.sampled_from(["/api/chat", "/api/generate"]))
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_hostile_ollama_bodies_get_no_server_error_and_streams_end_properly(fuzz_client, body,
                                                                            path):
    import json

    r = fuzz_client.post(path, content=json.dumps(body),
                         headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:300], body)
    if r.status_code >= 400:
        assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    elif r.headers["content-type"].startswith("application/x-ndjson"):
        lines = [json.loads(line) for line in r.text.splitlines() if line]
        assert lines and (lines[-1].get("done") is True or "error" in lines[-1]), lines[-3:]
    else:
        assert r.json()["done"] is True
