"""Tool calls read from every form a small model writes, streamed or whole, and the lazy grammar
that keeps them valid (issue 16). No model weights: a tiny tokenizer for the grammar tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgellm.chat.tools import ToolCallStream, messages_for_template, parse_tool_calls

TOOLS = [{"type": "function", "function": {
             "name": "get_weather", "parameters": {
                 "type": "object", "properties": {"city": {"type": "string"}},
                 "required": ["city"]}}},
         {"type": "function", "function": {
             "name": "add", "parameters": {
                 "type": "object", "properties": {"a": {"type": "integer"},
                                                  "b": {"type": "integer", "minimum": 0}},
                 "required": ["a", "b"], "additionalProperties": False}}}]

TAG = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
FENCE = '```json\n{\n  "name": "add",\n  "arguments": {\n    "a": 2,\n    "b": 3\n  }\n}\n```'
BARE = '{"name": "get_weather", "arguments": {"city": "Rome"}}'


def _calls(parsed):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.calls]


@pytest.mark.parametrize("text,expected,content", [
    (TAG, [("get_weather", {"city": "Paris"})], ""),
    (FENCE, [("add", {"a": 2, "b": 3})], ""),
    (BARE, [("get_weather", {"city": "Rome"})], ""),
    ("Let me check. " + TAG, [("get_weather", {"city": "Paris"})], "Let me check."),
    (TAG + "\n" + TAG.replace("Paris", "Tokyo"),
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})], ""),
    (BARE + "\n" + FENCE, [("get_weather", {"city": "Rome"}), ("add", {"a": 2, "b": 3})], ""),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # tag left open
     [("get_weather", {"city": "Paris"})], ""),
])
def test_every_form_of_call_is_read(text, expected, content):
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.error is None and _calls(parsed) == expected and parsed.content == content


@pytest.mark.parametrize("text", [
    '{"name": "Alice", "age": 3}',  # JSON asked for, not a call: its "name" is no tool
    'Here is one:\n```json\n{"name": "Bob", "arguments": {"x": 1}}\n```',
    "Use `{` braces and <b>tags</b> freely.",
    'The tool get_weather takes {"city": ...}.',
])
def test_json_and_markup_that_are_not_calls_stay_text(text):
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.calls == [] and parsed.error is None and parsed.content == text


def test_parallel_false_keeps_one_call_and_the_rest_as_text():
    parsed = parse_tool_calls(TAG + "\n" + BARE, TOOLS, parallel=False)
    assert _calls(parsed) == [("get_weather", {"city": "Paris"})]
    assert BARE in parsed.content


@pytest.mark.parametrize("text,words", [
    ('{"name": "add", "arguments": {"a": 2.5, "b": 3}}', "not of type 'integer'"),
    ('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', "unknown function"),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, ', "cut short"),
])
def test_invalid_calls_are_reported_not_passed_on(text, words):
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.calls == [] and words in parsed.error and parsed.content == text


@given(cuts=st.lists(st.integers(0, 400), max_size=12),
       text=st.sampled_from(["Sure. " + TAG + " Done.", FENCE + "\nand " + BARE,
                             'Plain {"name": "Al"} text ```py\nx = {1: 2}\n``` end']))
@settings(max_examples=200, deadline=None)
def test_streamed_events_assemble_to_the_whole_answer(cuts, text):
    """However the text arrives, the streamed content and calls equal the whole parse."""
    stream, events = ToolCallStream(TOOLS), []
    for cut in sorted(c for c in cuts if c < len(text)):
        events += stream.feed(text[:cut])
    events += stream.feed(text) + stream.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    calls = {}
    for e in events:
        if e[0] == "call":
            calls[e[1]] = [e[3], ""]
        elif e[0] == "arguments":
            calls[e[1]][1] += e[2]
    whole = parse_tool_calls(text, TOOLS)
    assert content.strip() == whole.content
    assert [(n, a) for n, a in calls.values()] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole.calls]


def test_a_template_without_tools_gets_hermes_instructions_and_tagged_turns():
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = messages_for_template(messages, TOOLS, template_has_tools=False)
    assert out[0]["role"] == "system" and "<tools>" in out[0]["content"]
    assert '"name": "get_weather"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", '
                                                      '"arguments": {"city": "Paris"}}\n'
                                                      '</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    same = messages_for_template(messages, TOOLS, template_has_tools=True)
    assert same[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert same[1]["content"] == "" and same[2]["role"] == "tool"


# --- the grammars, on a tiny byte-level tokenizer ----------------------------------------------

@pytest.fixture(scope="module")
def grammar(tmp_path_factory):
    from tokenizers import Tokenizer

    from edgellm.chat.constrained import ToolCallGrammar
    from helpers import write_tokenizer

    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return ToolCallGrammar(tok.to_str(), tok.get_vocab_size(), [2]), tok


def _allowed(mask, vocab):
    return np.unpackbits(np.frombuffer(mask.matcher.compute_bitmask(), dtype=np.uint8),
                         bitorder="little")[:vocab].astype(bool)


def _feed(mask, tok, text) -> bool:
    """Feed `text` byte token by byte token; False at the first token the grammar refuses."""
    for ch in text.encode():
        token = tok.token_to_id(bytes([ch]).decode("latin-1")) if ch >= 128 else \
            tok.encode(chr(ch), add_special_tokens=False).ids[0]
        if not mask.matcher.consume_token(token):
            return False
    return True


def test_the_lazy_grammar_leaves_text_free_and_holds_an_opened_call(grammar):
    g, tok = grammar
    vocab = tok.get_vocab_size()
    mask = g.lazy_calls(TOOLS)
    text_tokens = [i for i in range(vocab)  # every token that is whole UTF-8 text
                   if i > 2 and "\ufffd" not in tok.decode([i])]
    assert len(text_tokens) > 150 and _allowed(mask, vocab)[text_tokens].all()  # free text
    assert _feed(mask, tok, "Sure, 2 + 3: ")
    assert _feed(mask, tok, '{"name": "add"')  # the trigger: a tool's name
    assert not _feed(g.lazy_calls(TOOLS), tok, 'x {"name": "add", "arguments": {"a": 2.5')
    assert _feed(mask, tok, ', "arguments": {"a": 2, "b": 3}} and more text')
    assert mask.matcher.is_accepting()


def test_the_lazy_grammar_does_not_force_json_that_names_no_tool(grammar):
    g, tok = grammar
    mask = g.lazy_calls(TOOLS)
    assert _feed(mask, tok, '{"name": "Alice", "age": 3.5} ```json\n{"name": "Bo"}\n```')
    assert mask.matcher.is_accepting()


def test_the_lazy_grammar_holds_the_tag_form(grammar):
    g, tok = grammar
    assert not _feed(g.lazy_calls(TOOLS), tok, '<tool_call>\n{"name": "nope"')
    mask = g.lazy_calls(TOOLS, parallel=False)
    assert _feed(mask, tok, '<tool_call>\n{"name": "get_weather", "arguments": '
                            '{"city": "Paris"}}\n</tool_call> ok ')
    assert mask.matcher.is_accepting()


def test_response_format_schemas_compile_or_say_why(grammar):
    from edgellm.errors import EdgeLLMError

    g, tok = grammar
    mask = g.json_schema({"type": "object", "properties": {"n": {"type": "integer"}},
                          "required": ["n"], "additionalProperties": False})
    assert not _feed(g.json_schema({"type": "object", "properties": {"n": {"type": "integer"}},
                                    "required": ["n"], "additionalProperties": False}),
                     tok, '{"n": "x"')
    assert _feed(mask, tok, '{"n": 42}') and mask.matcher.is_accepting()
    with pytest.raises(EdgeLLMError, match="cannot constrain"):
        g.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})
