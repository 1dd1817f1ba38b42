"""Tool calls in the OpenAI shape, read from what a small model writes.

Three forms open a call, as small models write them (llama.cpp's tool-call parsers recognise the
same ones): the chat template's tag, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
a fenced block, ```` ```json {"name": ..., "arguments": {...}} ``` ````; and a bare object,
`{"name": ..., "arguments": {...}}`. A fenced or bare object is a call only when its `"name"` is
one of the offered tools, so JSON written for another reason stays text.

`ToolCallStream` reads the answer as it grows and says what is content and what is a call (its
name first, then its arguments as they come), so a streamed answer and a whole one give the same
calls; the arguments are the model's own JSON text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

OPEN_TAG, CLOSE_TAG, FENCE = "<tool_call>", "</tool_call>", "```"
_WS = " \t\r\n"


@dataclass
class ParsedCalls:
    content: str  # text outside the calls
    calls: list[dict]  # OpenAI tool_calls entries
    error: str | None  # why a call was rejected (never passed on as garbage)


@dataclass
class _Call:
    name: str
    form: str  # "tag", "fence" or "bare"
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    arguments: str = ""  # the model's JSON text of the arguments
    complete: bool = False


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _literal(s: str, i: int, word: str):
    """End of `word` at s[i:], None if s[i:] goes elsewhere, "partial" if s ends inside it."""
    tail = s[i:i + len(word)]
    if not word.startswith(tail):
        return None
    return i + len(word) if len(tail) == len(word) else "partial"


def _object_head(s: str, i: int, names: set[str], any_name: bool):
    """`{ "name" : "NAME"` at s[i:]: (end, name), None, or "partial"."""
    j = _literal(s, i, "{")
    for step in (None, '"name"', None, ":", None, '"'):
        if not isinstance(j, int):
            return j
        j = _skip_ws(s, j) if step is None else _literal(s, j, step)
        if j == len(s):
            return "partial"
    if not isinstance(j, int):
        return j
    start, name = j, None
    while j < len(s):
        if s[j] == "\\":
            j += 2
            continue
        if s[j] == '"':
            name = s[start:j]
            break
        j += 1
    if name is None:  # still inside the name
        typed = s[start:]
        return "partial" if any_name or any(n.startswith(typed) for n in names) else None
    if not any_name and name not in names:
        return None
    try:
        return j + 1, json.loads(f'"{name}"')
    except json.JSONDecodeError:
        return None


def _opener(s: str, i: int, names: set[str]):
    """A call opening at s[i:]: (form, end, name), None, or "partial"."""
    if s[i] == "<":
        j = _literal(s, i, OPEN_TAG)
        if isinstance(j, int):
            j = _skip_ws(s, j)
            head = "partial" if j == len(s) else _object_head(s, j, names, any_name=True)
            return ("tag", *head) if isinstance(head, tuple) else head
        return j
    if s[i] == "`":
        j = _literal(s, i, FENCE)
        if isinstance(j, int):
            lang = _literal(s, j, "json")
            j = lang if isinstance(lang, int) else j
            if lang == "partial":
                return "partial"
            j = _skip_ws(s, j)
            head = "partial" if j == len(s) else _object_head(s, j, names, any_name=False)
            return ("fence", *head) if isinstance(head, tuple) else head
        return j
    if s[i] == "{":
        head = _object_head(s, i, names, any_name=False)
        return ("bare", *head) if isinstance(head, tuple) else head
    return None


def _json_value_end(s: str, i: int) -> int | None:
    """End of the JSON object or array starting at s[i] (strings respected), None if open."""
    depth, in_string, j = 0, False, i
    while j < len(s):
        c = s[j]
        if in_string:
            if c == "\\":
                j += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


class ToolCallStream:
    """Feed it the whole answer so far, as often as it grows; it returns what became certain:
    ("content", text), ("call", index, id, name) and ("arguments", index, fragment) events."""

    def __init__(self, tools: list[dict], parallel: bool = True):
        self.names = {t["function"]["name"] for t in tools}
        self.parallel = parallel
        self.calls: list[_Call] = []
        self.content: list[str] = []
        self.error: str | None = None
        self._text, self._pos, self._state = "", 0, "out"

    def feed(self, text: str) -> list[tuple]:
        self._text, events = text, []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[tuple]:
        """The answer has ended: what was held back is content; a call left open is an error."""
        events = self.feed(self._text)
        if self._state == "out":
            rest = self._text[self._pos:]
            if rest:
                self.content.append(rest)
                events.append(("content", rest))
            self._pos = len(self._text)
        elif self._state in ("after_arguments", "closing") and self.calls[-1].complete:
            self._state = "out"  # the closing tag or fence may be missing at the very end
        else:
            self.error = self.error or f"the call to {self.calls[-1].name} was cut short"
        return events

    # --- one step of the state machine; False when it must wait for more text -------------

    def _step(self, events: list) -> bool:
        return getattr(self, f"_{self._state}")(events)

    def _out(self, events) -> bool:
        s, i = self._text, self._pos
        if self.calls and not self.parallel:  # at most one call: the rest is text
            return self._emit_content(events, len(s))
        hold = None
        for j in range(i, len(s)):
            if s[j] not in "<`{":
                continue
            found = _opener(s, j, self.names)
            if found == "partial":
                hold = j if hold is None else hold
            elif found is not None:
                form, end, name = found
                self._emit_content(events, j)
                self.calls.append(_Call(name, form))
                events.append(("call", len(self.calls) - 1, self.calls[-1].id, name))
                self._pos, self._state = end, "before_arguments"
                return True
        return self._emit_content(events, len(s) if hold is None else hold)

    def _emit_content(self, events, end: int) -> bool:
        if end > self._pos:
            piece = self._text[self._pos:end]
            self.content.append(piece)
            events.append(("content", piece))
            self._pos = end
        return False

    def _before_arguments(self, events) -> bool:
        s, j = self._text, _skip_ws(self._text, self._pos)
        if j == len(s):
            return False
        if s[j] == "}":  # {"name": "f"}: no arguments
            self.calls[-1].arguments, self.calls[-1].complete = "{}", True
            self._pos, self._state = j + 1, "closing"
            return True
        for word in (",", None, '"arguments"', None, ":", None):
            j = _skip_ws(s, j) if word is None else _literal(s, j, word)
            if j is None:
                return self._malformed(f"the call to {self.calls[-1].name} has no arguments")
            if j == "partial" or j == len(s):
                return False
        if s[j] not in "{[":
            return self._malformed(f"arguments of {self.calls[-1].name} are not a JSON object")
        self._pos, self._state = j, "arguments"
        return True

    def _arguments(self, events) -> bool:
        call, s = self.calls[-1], self._text
        start = self._pos - len(call.arguments)
        end = _json_value_end(s, start)
        upto = len(s) if end is None else end
        if upto > self._pos:
            events.append(("arguments", len(self.calls) - 1, s[self._pos:upto]))
            call.arguments += s[self._pos:upto]
            self._pos = upto
        if end is None:
            return False
        call.complete, self._state = True, "after_arguments"
        return True

    def _after_arguments(self, events) -> bool:
        j = _skip_ws(self._text, self._pos)
        if j == len(self._text):
            return False
        if self._text[j] != "}":
            return self._malformed(f"the call to {self.calls[-1].name} does not close")
        self._pos, self._state = j + 1, "closing"
        return True

    def _closing(self, events) -> bool:
        form = self.calls[-1].form
        if form == "bare":
            self._state = "out"
            return True
        s, j = self._text, _skip_ws(self._text, self._pos)
        if j == len(s):
            return False
        end = _literal(s, j, CLOSE_TAG if form == "tag" else FENCE)
        if end == "partial":
            return False
        self._pos, self._state = (end if isinstance(end, int) else self._pos), "out"
        return True

    def _malformed(self, why: str) -> bool:
        self.error = self.error or why
        self._state = "broken"
        return False

    def _broken(self, events) -> bool:
        return False


def _validate(name: str, arguments: str, tools: list[dict]) -> str | None:
    spec = next((t["function"] for t in tools if t.get("function", {}).get("name") == name), None)
    if spec is None:
        return f"the model called an unknown function {name!r}"
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        return f"arguments of {name} are not valid JSON ({e.msg})"
    if not isinstance(value, dict):
        return f"arguments of {name} are not a JSON object"
    schema = spec.get("parameters")
    if schema:
        import jsonschema

        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as e:
            return f"arguments of {name} do not match its schema: {e.message}"
    return None


def openai_calls(stream: ToolCallStream) -> list[dict]:
    return [{"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in stream.calls]


def parse_tool_calls(text: str, tools: list[dict], parallel: bool = True) -> ParsedCalls:
    """Split a whole answer into plain content and validated tool calls."""
    stream = ToolCallStream(tools, parallel)
    stream.feed(text)
    stream.finish()
    content = "".join(stream.content).strip()
    if not stream.calls:
        return ParsedCalls(text, [], stream.error)
    error = stream.error or next((e for c in stream.calls
                                  if (e := _validate(c.name, c.arguments, tools))), None)
    if error:
        return ParsedCalls(text, [], error)
    return ParsedCalls(content, openai_calls(stream), None)


def forced_prefix(tool_choice, tools: list[dict]) -> str:
    """Text that starts the answer when a call is required: the tag, and the name if fixed."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        return f'{OPEN_TAG}\n{{"name": "{name}", "arguments": '
    if tool_choice == "required" and len(tools) == 1:
        return f'{OPEN_TAG}\n{{"name": "{tools[0]["function"]["name"]}", "arguments": '
    return f'{OPEN_TAG}\n{{"name": "' if tool_choice == "required" else ""


# For chat templates that do not render tools: the Hermes / Qwen2.5 instructions, in a system
# message, and calls and results written as the tags those models read.
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # content parts: the schema has let only text ones through
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content


def messages_for_template(messages: list[dict], tools: list[dict] | None = None,
                          template_has_tools: bool = True) -> list[dict]:
    """OpenAI messages -> what HF chat templates expect (tool-call arguments as objects). For a
    template that cannot render tools, `tools` go into the system message as instructions, and
    calls and tool results into the text."""
    out = []
    for m in messages:
        m = dict(m)
        calls = []
        for c in m.get("tool_calls") or []:
            f = dict(c.get("function", {}))
            if isinstance(f.get("arguments"), str):
                try:
                    f["arguments"] = json.loads(f["arguments"])
                except json.JSONDecodeError:
                    pass
            calls.append({**c, "function": f})
        if calls:
            m["tool_calls"] = calls
        m["content"] = _text_of(m.get("content"))
        if not template_has_tools:
            m = _as_plain_turn(m)
        out.append(m)
    if tools and not template_has_tools:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        preamble = TOOLS_PREAMBLE.format(tools=listed)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}".strip()}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def _as_plain_turn(m: dict) -> dict:
    if m["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    if m.get("tool_calls"):
        written = "\n".join(
            f'{OPEN_TAG}\n{json.dumps({"name": c["function"].get("name"), "arguments": c["function"].get("arguments", {})}, ensure_ascii=False)}\n{CLOSE_TAG}'  # noqa: E501
            for c in m["tool_calls"])
        return {"role": "assistant", "content": f"{m['content']}\n{written}".strip()}
    return {k: v for k, v in m.items() if k in ("role", "content")}
