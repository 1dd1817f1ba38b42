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
