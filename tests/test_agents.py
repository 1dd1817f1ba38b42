"""Agents on the default model (issue 16): the official client and LangChain against a live
server, tool_choice auto under the lazy grammar, response_format, streamed calls (round trips:
tests/test_server.py)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from edgellm.runtime.generator import GenerationResult, Generator
from edgellm.server.app import create_app
from helpers import start_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

MODEL = "qwen-agent"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
         "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
     "parameters": {"type": "object", "properties": {
         "a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0}},
         "required": ["a", "b"], "additionalProperties": False}}},
]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def generator(qwen_s8):
    return Generator.load(qwen_s8, threads=2)


def _client(app):
    srv, thread, url = start_server(app)
    return srv, thread, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), url


@pytest.fixture(scope="module")
def live(generator):
    srv, thread, client, url = _client(create_app(generator, MODEL))
    yield client, url
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def free(generator):
    """The same model with the lazy grammar switched off: what it is worth."""
    srv, thread, client, _ = _client(create_app(generator, MODEL, tool_grammar=False))
    yield client
    srv.should_exit = True
    thread.join(10)


def _ask(client, question, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                  "content": question}],
                                          temperature=0, max_tokens=120, **kw)


@pytest.mark.parametrize("question", ["What is 7 plus -4?", "Add 2.5 and 3."])
def test_auto_calls_are_made_valid_once_opened(live, free, question):
    """The model opens an `add` call on its own and, left free, breaks the schema (a negative
    b, a float); under the lazy grammar the same call comes back valid."""
    loose = _ask(free, question, tools=TOOLS).choices[0].message
    assert not loose.tool_calls and "tool_call_error" in loose.model_extra, loose
    reply = _ask(live[0], question, tools=TOOLS).choices[0]
    (call,) = reply.message.tool_calls
    assert reply.finish_reason == "tool_calls" and call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])


def test_json_asked_for_in_plain_text_stays_text(live):
    reply = _ask(live[0], "Print a JSON object with a name and an age for a person called Alice.",
                 tools=TOOLS).choices[0]
    assert reply.finish_reason == "stop" and not reply.message.tool_calls
    assert "Alice" in reply.message.content


def test_a_plain_question_gets_a_plain_answer(live):
    reply = _ask(live[0], "Write a haiku about the sea.", tools=TOOLS).choices[0]
    assert reply.finish_reason == "stop" and not reply.message.tool_calls
    assert len(reply.message.content) > 10


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.5, "seed": 1},
                                      {"temperature": 1.5, "seed": 2},
                                      {"temperature": 1.5, "seed": 3}])
def test_response_format_json_schema_always_validates(live, sampling):
    """The schema bounds the answer (a name of at most 24 characters), so it always ends
    within max_tokens; an unbounded one at temperature 1.5 may run until cut (length)."""
    r = live[0].chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        max_tokens=100, **({"temperature": 0} | sampling))
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    if not sampling:
        r = live[0].chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Give me some JSON."}],
            response_format={"type": "json_object"}, max_tokens=100, temperature=0)
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_a_schema_llguidance_cannot_compile_is_a_400(live):
    client, _ = live
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object",
                                        "properties": {"a": {"$ref": "#/$defs/nope"}}}}})
    assert "cannot constrain" in e.value.body["message"]


@pytest.mark.parametrize("question", ["What is 7 plus -4?", "Weather in Rome, in celsius?"])
def test_streamed_calls_assemble_to_the_non_streamed_ones(live, question):
    whole = _ask(live[0], question, tools=TOOLS).choices[0].message.tool_calls
    stream = _ask(live[0], question, tools=TOOLS, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name,
                                                "arguments": ""})
            entry["arguments"] += tc.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls" and whole
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole]
    assert all(c["id"] for c in calls.values())


def test_langchain_streaming_assembles_the_same_calls(live):
    import langchain_openai

    _, url = live
    llm = langchain_openai.ChatOpenAI(base_url=url + "/v1", api_key="x", model=MODEL,
                                      temperature=0, max_retries=0).bind_tools(TOOLS)
    question = "What is 7 plus -4?"
    whole = llm.invoke(question).tool_calls
    merged = None
    for chunk in llm.stream(question):
        merged = chunk if merged is None else merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == \
        [(c["name"], c["args"]) for c in whole]
    assert whole and whole[0]["name"] == "add" and whole[0]["args"]["b"] >= 0


@pytest.fixture(scope="module")
def canned(generator, tmp_path_factory):
    """A live server whose model 'answers' with given text: the server's parsing, seen by the
    official client, for every form of call."""
    answers = []

    class Canned:
        def __getattr__(self, name):
            return getattr(generator, name)

        def generate(self, ids, sampling, max_new_tokens, on_text=None, **kw):
            text = answers.pop(0)
            if on_text:
                on_text(text)
            return GenerationResult(text, [0] * 5, len(ids), 1.0, 1.0, 1.0, "eos")

    srv, thread, client, _ = _client(create_app(Canned(), MODEL, tool_grammar=False))
    yield client, answers
    srv.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    '```json\n{\n  "name": "add",\n  "arguments": {"a": 1, "b": 2}\n}\n```',
    '{"name": "add", "arguments": {"a": 1, "b": 2}}',
    'I will add them. {"name": "add", "arguments": {"a": 1, "b": 2}}'])
def test_each_form_of_call_reaches_the_client_as_a_tool_call(canned, text):
    client, answers = canned
    answers.append(text)
    reply = _ask(client, "1 + 2?", tools=TOOLS).choices[0]
    (call,) = reply.message.tool_calls
    assert reply.finish_reason == "tool_calls" and call.function.name == "add"
    assert json.loads(call.function.arguments) == {"a": 1, "b": 2}


def test_parallel_calls_and_parallel_false(canned):
    client, answers = canned
    two = ('{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
           '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}')
    answers += [two, two]
    names = [c.function.name for c in _ask(client, "?", tools=TOOLS).choices[0].message.tool_calls]
    assert names == ["add", "get_weather"]
    one = _ask(client, "?", tools=TOOLS, parallel_tool_calls=False).choices[0].message
    assert [c.function.name for c in one.tool_calls] == ["add"]


@pytest.fixture(scope="module")
def checking(generator):
    """Two servers asking the model about each call it makes: one that keeps any call the model
    gives a p(yes) of at least 0.001, one that wants 0.999 (which no call of this model gets)."""
    servers = [_client(create_app(generator, MODEL, check_calls=p)) for p in (0.001, 0.999)]
    yield [(client, url) for _, _, client, url in servers]
    for srv, thread, _, _ in servers:
        srv.should_exit = True
        thread.join(10)


def test_check_calls_asks_the_model_and_answers_in_words_where_it_says_no(live, checking):
    """serve --check-calls P: a call the model does not hold to fit (p(yes) < P) becomes the
    answer in words, on both APIs, streamed or not; a call it does hold stands, as without the
    check; a required call is never asked about."""
    import httpx

    (lenient, _), (strict, strict_url) = checking
    question = "What is 7 plus -4?"
    want = _ask(live[0], question, tools=TOOLS).choices[0].message.tool_calls
    kept = _ask(lenient, question, tools=TOOLS).choices[0]
    assert kept.finish_reason == "tool_calls" and [
        (c.function.name, c.function.arguments) for c in kept.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in want]
    said = _ask(strict, question, tools=TOOLS).choices[0]
    assert said.finish_reason == "stop" and not said.message.tool_calls, said
    # the grammar of tool_choice none: no call of an offered tool, not even as text
    assert said.message.content and '"name": "add"' not in said.message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       _ask(strict, question, tools=TOOLS, stream=True) if c.choices)
    assert streamed == said.message.content
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}],
            "tools": TOOLS, "options": {"temperature": 0, "num_predict": 120}}
    for stream in (False, True):
        r = httpx.post(strict_url + "/api/chat", json={**body, "stream": stream}, timeout=120)
        lines = [json.loads(line) for line in r.text.splitlines()] if stream else [r.json()]
        assert r.status_code == 200 and not any(m.get("message", {}).get("tool_calls")
                                                for m in lines), lines
        words = "".join(m["message"]["content"] for m in lines)
        assert words and '"name": "add"' not in words, lines
    forced = _ask(strict, question, tools=TOOLS, tool_choice="required").choices[0]
    assert forced.finish_reason == "tool_calls" and forced.message.tool_calls


def test_the_yes_or_no_mask_follows_the_threshold(generator):
    import numpy as np

    from edgellm.server.steps import YesOrNo

    logits = np.zeros(generator.tokenizer.get_vocab_size(), np.float32)
    verdict = YesOrNo(generator, 0.6)
    logits[verdict.yes] = np.log(0.55 / len(verdict.yes))  # p(yes) 0.55 against p(no) 0.45
    logits[verdict.no] = np.log(0.45 / len(verdict.no))
    masked = verdict.apply(logits)
    assert verdict.p_yes == pytest.approx(0.55, abs=1e-6)
    assert np.isfinite(masked).sum() == 1 and np.isfinite(masked[verdict.no[0]])
    assert np.isfinite(YesOrNo(generator, 0.5).apply(logits)[verdict.yes[0]])
    assert generator.tokenizer.decode([verdict.yes[0]]).strip().lower() == "yes"
    assert generator.tokenizer.decode([verdict.no[0]]).strip().lower() == "no"
