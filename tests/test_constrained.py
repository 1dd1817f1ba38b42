"""Forced tool calls decoded under the llguidance mask: always valid JSON for the schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from edgellm.chat.constrained import ToolCallGrammar, _lark_rest_of_call
from edgellm.chat.tools import forced_prefix, parse_tool_calls
from edgellm.runtime.generator import Generator
from edgellm.runtime.sampler import SamplingConfig

pytestmark = pytest.mark.slow

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0}},
            "required": ["a", "b"], "additionalProperties": False}}},
]
# A request with nothing to call: left free, the model invents a function or bad arguments.
OFF_TOPIC = [{"role": "user", "content": "Tell me a joke about cats."}]
NAMED_ADD = {"type": "function", "function": {"name": "add"}}


@pytest.fixture(scope="module")
def generator(qwen_s8):
    return Generator.load(qwen_s8, threads=2)


@pytest.fixture(scope="module")
def grammar(generator):
    return ToolCallGrammar.for_generator(generator)


def _call(generator, choice, sampling, mask_from=None):
    prefix = forced_prefix(choice, TOOLS)
    text = generator.template.render(OFF_TOPIC, add_generation_prompt=True, tools=TOOLS)
    ids = generator.tokenizer.encode(text + prefix, add_special_tokens=False).ids
    mask = mask_from.mask_after(prefix, TOOLS) if mask_from else None
    result = generator.generate(ids, sampling, 96, mask=mask)
    return parse_tool_calls(prefix + result.text, TOOLS), result


@pytest.mark.parametrize("choice", ["required", NAMED_ADD])
def test_unconstrained_forced_calls_go_wrong_here(generator, choice):
    """The case the mask exists for: without it, greedy output is not a valid call."""
    parsed, _ = _call(generator, choice, SamplingConfig())
    assert parsed.error and not parsed.calls


@pytest.mark.parametrize("choice", ["required", NAMED_ADD])
@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_constrained_calls_always_match_the_schema(generator, grammar, choice, seed):
    sampling = SamplingConfig() if seed is None else SamplingConfig(temperature=1.5, seed=seed)
    parsed, result = _call(generator, choice, sampling, mask_from=grammar)
    assert parsed.error is None and result.stop_reason == "eos", (parsed, result.text)
    (call,) = parsed.calls
    fn = call["function"]
    if choice == NAMED_ADD:
        assert fn["name"] == "add"
    spec = next(t["function"] for t in TOOLS if t["function"]["name"] == fn["name"])
    jsonschema.validate(json.loads(fn["arguments"]), spec["parameters"])


def test_grammar_keeps_the_template_json_layout():
    lark = _lark_rest_of_call(forced_prefix("required", TOOLS), TOOLS)
    assert lark.startswith("start: first (WS? \"</tool_call>\"")  # then more calls
    assert 'first0: "get_weather\\", \\"arguments\\": " %json' in lark
    assert '"item_separator": ", "' in lark


LIGHTS = [{"type": "function", "function": {
    "name": n, "description": d, "parameters": {"type": "object", "properties": {
        "name": {"type": "string", "description": "the device"}}, "required": ["name"]}}}
    for n, d in (("turn_on_light", "Turn a light on"), ("get_state", "Read a device's state"))]
AFTER_A_RESULT = [
    {"role": "user", "content": "Turn on the kitchen light."},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
     "function": {"name": "turn_on_light", "arguments": json.dumps({"name": "kitchen"})}}]},
    {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"success": True,
                                                                  "state": "on"})}]


def test_tool_choice_none_answers_in_words_after_a_result(generator, grammar):
    """Issue 33, item 12: with tool_choice none after a tool result, Qwen2.5-Coder-0.5B wrote
    the call again as JSON text; the mask for none keeps an answer from opening an object or a
    fence and from holding an offered tool's call head anywhere, so it answers in words."""
    from edgellm.server.schemas import ChatRequest
    from edgellm.server.steps import encode_chat

    req = ChatRequest(model="m", messages=AFTER_A_RESULT, tools=LIGHTS, tool_choice="none")
    ids, prefix, active, _ = encode_chat(generator, req)
    assert prefix == "" and active == []
    free = generator.generate(ids, SamplingConfig(), 60).text
    assert free.startswith('{"name": "turn_on_light"')  # the case this exists for
    held = generator.generate(ids, SamplingConfig(), 60, mask=grammar.no_calls(LIGHTS)).text
    assert held.strip() and '"name"' not in held and not held.lstrip().startswith(("{", "`"))
    assert "on" in held  # it says what the result said

    def accepts(text):
        mask = grammar.no_calls(LIGHTS)
        return all(mask.matcher.consume_token(t) for t in
                   generator.tokenizer.encode(text, add_special_tokens=False).ids)

    assert accepts("The kitchen light is on.")
    assert accepts('As JSON that would be {"state": "on"}.')  # other objects stay text
    assert not accepts('Done: {"name": "get_state", "arguments": {}}')
    assert not accepts('{"state": "on"}') and not accepts("```json\n{}\n```")
