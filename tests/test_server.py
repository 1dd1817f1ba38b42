"""A real server on loopback, spoken to with the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from edgellm.runtime.generator import Generator
from edgellm.server.app import create_app
from helpers import assert_idle, start_server

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytestmark = pytest.mark.slow

MODEL = "qwen-test"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def generator(qwen_s8):
    return Generator.load(qwen_s8, threads=2)


@pytest.fixture(scope="module")
def server(generator):
    app = create_app(generator, MODEL, max_queue=4, max_body=64 * 1024)
    srv, thread, url = start_server(app)
    yield url, app
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _post(url, body: bytes, headers=None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(server[0] + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


def test_plain_chat_with_real_usage(client, generator):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(generator.encode_chat(QUESTION))
    assert r.usage.completion_tokens == len(generator.tokenizer.encode(
        r.choices[0].message.content, add_special_tokens=False).ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_plain(client):
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                 stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_max_tokens_and_stop(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                       stop=["Paris"])
    assert r.choices[0].finish_reason == "stop"
    assert "Paris" not in r.choices[0].message.content
    assert r.choices[0].message.content.startswith("The capital of France is")


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_tool_call_round_trip(client, choice):
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                       tool_choice=choice, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id,
                  "content": json.dumps({"temperature_c": 18, "sky": "cloudy"})}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                           tool_choice="none", temperature=0)
    assert final.choices[0].message.tool_calls is None
    assert "18" in final.choices[0].message.content
    assert '"name"' not in final.choices[0].message.content  # none: no call written as text


def test_named_tool_choice_streams_a_call(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Rome?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0,
        stream=True)
    calls = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id and calls[0].index == 0
    arguments = "".join(tc.function.arguments or "" for tc in calls)  # fragments, as decoded
    assert len(calls) > 2 and json.loads(arguments)["city"] == "Rome"


def test_required_call_is_valid_even_off_topic(client):
    """With tool_choice=required the call is decoded under the schema's grammar."""
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a joke about cats."}],
        tools=TOOLS, tool_choice="required", temperature=1.5, seed=3)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_langchain_agent_calls_a_tool(server):
    """An agent framework pointed at edgellm: LangChain's ChatOpenAI with a bound tool."""
    import langchain_openai
    llm = langchain_openai.ChatOpenAI(base_url=server[0] + "/v1", api_key="unused", model=MODEL,
                                      temperature=0, max_retries=0)
    reply = llm.bind_tools(TOOLS).invoke("What is the weather in Paris right now?")
    assert reply.tool_calls[0]["name"] == "get_weather"
    assert reply.tool_calls[0]["args"] == {"city": "Paris"}


def test_full_queue_answers_429(client, server):
    served = server[1].state.served
    served.pending = served.max_queue + 1  # as if that many requests were in line
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=QUESTION)
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        served.pending = 0
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)


def test_disconnect_cancels_generation(server):
    url, app = server
    served = app.state.served
    before = served.metrics["completion_tokens_total"]
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 400, "temperature": 0,
                       "messages": [{"role": "user", "content": "Count from 1 to 500."}]})
    req = urllib.request.Request(url + "/v1/chat/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        r.readline(), r.readline(), r.readline()
    assert_idle(served)
    assert served.metrics["completion_tokens_total"] - before < 300


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "invalid JSON"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "temperature": "hot"}).encode(), 400,
     "temperature"),
    (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"model": "gpt-9", "messages": QUESTION}).encode(), 404, "gpt-9"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "n": 2}).encode(), 400, "n=1"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "presence_penalty": 1}).encode(), 400,
     "presence_penalty"),
    (json.dumps({"model": MODEL, "messages": [
        {"role": "user", "content": "word " * 600}]}).encode(), 400, "--ctx-size"),
    (json.dumps({"model": MODEL, "messages": [
        {"role": "user", "content": "x" * 70_000}]}).encode(), 413, "body over"),
])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, client, body,
                                                                     status, words):
    code, payload, _ = _post(server[0] + "/v1/chat/completions", body)
    assert code == status
    assert set(payload["error"]) >= {"message", "type", "param", "code"}
    assert words in payload["error"]["message"]
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)


def test_api_key_guards_every_route_but_health(generator):
    srv, thread, url = start_server(create_app(generator, MODEL, api_key="s3cret"))
    try:
        with urllib.request.urlopen(url + "/health") as r:
            assert r.status == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            code, payload, _ = _post(url + "/v1/chat/completions", b"{}", headers)
            assert code == 401 and payload["error"]["type"] == "authentication_error"
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in ok.models.list().data] == [MODEL]
    finally:
        srv.should_exit = True
        thread.join(10)


def test_prefix_cache_skips_the_shared_prompt(client, server):
    served = server[1].state.served
    system = {"role": "system", "content": "You are a terse assistant. " * 20}
    first = [system, {"role": "user", "content": "Name a color."}]
    client.chat.completions.create(model=MODEL, messages=first, temperature=0, max_tokens=4)
    hits = served.metrics["prefix_cache_hits_total"]
    reused = served.metrics["prefix_cache_reused_tokens_total"]
    second = [system, {"role": "user", "content": "Name a fruit."}]
    client.chat.completions.create(model=MODEL, messages=second, temperature=0, max_tokens=4)
    assert served.metrics["prefix_cache_hits_total"] == hits + 1
    assert served.metrics["prefix_cache_reused_tokens_total"] - reused > 100


def test_metrics_are_prometheus_text(server):
    with urllib.request.urlopen(server[0] + "/metrics") as r:
        text = r.read().decode()
    assert "edgellm_requests_total " in text and "edgellm_queue_depth 0" in text


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def test_web_page_streams_an_answer_in_chromium(server):
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: .ci/run installs Debian's chromium package")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(server[0] + "/")
        page.fill("#input", "What is the capital of France?")
        page.click("#send")
        page.wait_for_function(
            "document.querySelector('.assistant') && "
            "document.querySelector('#send').disabled === false && "
            "document.querySelector('.assistant').textContent.length > 0", timeout=60_000)
        answer = page.text_content(".assistant")
        stats = page.text_content("#stats")
        browser.close()
    assert "Paris" in answer
    assert "TTFT" in stats


def test_web_page_asks_for_the_key_and_shows_every_failure(generator):
    """Issue 33, item 1: with `serve --api-key` the page said nothing (its GET /v1/models got a
    401 and the script died on it). Now it asks for the key (kept in the tab's session), names
    the model, and shows a failed request (a wrong key, a prompt over the context) on the page."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: .ci/run installs Debian's chromium package")
    app = create_app(generator, MODEL, api_key="sesame")
    srv, thread, url = start_server(app)
    done = "document.querySelector('#send').disabled === false"
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#keyform", state="visible", timeout=30_000)
            assert "API key" in page.text_content("#keyform")
            page.fill("#input", "What is the capital of France?")  # without the key
            page.click("#send")
            page.wait_for_selector(".assistant .error", timeout=30_000)
            assert "missing or wrong API key" in page.text_content(".assistant .error")
            page.fill("#key", "sesame")
            page.click("#keyform button")
            page.wait_for_function(f"document.querySelector('#model').textContent === "
                                   f"'{MODEL}'", timeout=30_000)
            assert page.is_hidden("#keyform")
            page.fill("#input", "What is the capital of France?")
            page.click("#send")
            page.wait_for_function(f"document.querySelectorAll('.assistant').length === 2 && "
                                   f"{done}", timeout=60_000)
            answer = page.locator(".assistant").nth(1).text_content()
            page.fill("#input", "word " * 3000)  # past the 1023-position context: a 400
            page.click("#send")
            page.wait_for_function(f"document.querySelectorAll('.assistant').length === 3 && "
                                   f"{done}", timeout=60_000)
            too_long = page.locator(".assistant").nth(2).text_content()
            key = page.evaluate("sessionStorage.getItem('edgellm-key')")
            browser.close()
    finally:
        srv.should_exit = True
        thread.join(10)
    assert "Paris" in answer and "error" not in answer
    assert "[error: the prompt has" in too_long and "--ctx-size" in too_long
    assert key == "sesame"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """A stand-in for a cloud server: another edgellm on loopback, tiny model, long context."""
    from edgellm.compiler import BuildOptions, build
    from helpers import make_tiny_model

    tmp = tmp_path_factory.mktemp("cloud")
    make_tiny_model(tmp / "hf", "qwen2", tied=False)
    art = build(tmp / "hf", tmp / "art", BuildOptions(kv_cache_len=2048))
    srv, thread, url = start_server(create_app(Generator.load(art, threads=1), "cloud-model"))
    yield url
    srv.should_exit = True
    thread.join(10)


def test_upstream_answers_other_models_and_long_prompts(generator, cloud):
    from edgellm.server.upstream import Upstream

    edge = create_app(generator, MODEL, upstream=Upstream(cloud + "/v1", model="cloud-model"))
    srv, thread, url = start_server(edge)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        local = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=3)
        assert local.headers["x-edgellm-served-by"] == "local"
        long_prompt = [{"role": "user", "content": "word " * 600}]  # over the edge's 512
        far = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=long_prompt, max_tokens=2)
        assert far.headers["x-edgellm-served-by"] == "upstream"
        assert far.headers["x-edgellm-forward-reason"] == "context"
        assert far.parse().usage.prompt_tokens > 512
        stream = client.chat.completions.with_raw_response.create(
            model="other-model", messages=QUESTION, max_tokens=2, stream=True)
        assert stream.headers["x-edgellm-served-by"] == "upstream"
        chunks = list(stream.parse())
        assert chunks[-1].model == "cloud-model"  # relayed as server-sent events
    finally:
        srv.should_exit = True
        thread.join(10)


def test_the_grammar_made_while_the_model_loads_serves_the_first_mask(generator):
    """Issue 42: serve makes the tool-call grammar tokenizer while the engine loads (it cost a
    restarted server's first request with tools 1.3-1.5 s); the first mask takes it, and one
    that failed to build is made again on first use."""
    from concurrent.futures import Future

    from edgellm.chat.constrained import ToolCallGrammar
    from edgellm.runtime.prefix_cache import PrefixCache
    from edgellm.server.scheduler import Scheduler
    from edgellm.server.serving import _grammar_while_loading

    made = _grammar_while_loading(generator.artifact).result(timeout=120)
    direct = ToolCallGrammar.for_generator(generator)
    assert made.tag_is_token == direct.tag_is_token
    def after(grammar, text):  # the mask after the model wrote `text`
        mask = grammar.json_schema({"type": "object", "properties": {"city": {"type": "string"}}})
        for token in generator.tokenizer.encode(text, add_special_tokens=False).ids:
            mask.advance(token)
        return mask.matcher.compute_bitmask()

    assert after(made, '{"city": "Pa') == after(direct, '{"city": "Pa')
    scheduler = Scheduler(generator, 4, PrefixCache(generator, 0), grammar_build=Future())
    scheduler.grammar_build.set_result(made)
    assert scheduler.mask(lambda g: g, "tools") is made
    failed = Future()
    failed.set_exception(RuntimeError("no grammar"))
    scheduler = Scheduler(generator, 4, PrefixCache(generator, 0), grammar_build=failed)
    again = scheduler.mask(lambda g: g, "tools")
    assert isinstance(again, ToolCallGrammar) and again is not made
