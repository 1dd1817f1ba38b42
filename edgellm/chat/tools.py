"""Tool calls in the OpenAI shape, parsed from `<tool_call>{json}</tool_call>` output."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
OPEN_TAG = "<tool_call>"


@dataclass
class ParsedCalls:
    content: str  # text outside the tool-call tags
    calls: list[dict]  # OpenAI tool_calls entries
    error: str | None  # why a call was rejected (never passed on as garbage)


def _validate(name: str, arguments, tools: list[dict]) -> str | None:
    spec = next((t["function"] for t in tools if t.get("function", {}).get("name") == name), None)
    if spec is None:
        return f"the model called an unknown function {name!r}"
    if not isinstance(arguments, dict):
        return f"arguments of {name} are not a JSON object"
    schema = spec.get("parameters")
    if schema:
        import jsonschema

        try:
            jsonschema.validate(arguments, schema)
        except jsonschema.ValidationError as e:
            return f"arguments of {name} do not match its schema: {e.message}"
    return None


def _looks_like_bare_call(text: str, tools: list[dict]) -> bool:
    """Small models often answer a call as the bare JSON object, without the tags."""
    try:
        obj = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    names = {t["function"]["name"] for t in tools}
    return isinstance(obj, dict) and obj.get("name") in names and "arguments" in obj


def parse_tool_calls(text: str, tools: list[dict]) -> ParsedCalls:
    """Split model output into plain content and validated tool calls."""
    bodies = _CALL.findall(text)
    content = _CALL.sub("", text).strip()
    if not bodies:
        if not _looks_like_bare_call(text, tools):
            return ParsedCalls(text, [], None)
        bodies, content = [text.strip()], ""
    calls = []
    for body in bodies:
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            return ParsedCalls(text, [], f"a tool call is not valid JSON ({e.msg})")
        name, arguments = call.get("name"), call.get("arguments", {})
        error = _validate(name, arguments, tools)
        if error:
            return ParsedCalls(text, [], error)
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments,
                                                                         ensure_ascii=False)}})
    return ParsedCalls(content, calls, None)


def forced_prefix(tool_choice, tools: list[dict]) -> str:
    """Text that starts the answer when a call is required: the tag, and the name if fixed."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        return f'{OPEN_TAG}\n{{"name": "{name}", "arguments": '
    if tool_choice == "required" and len(tools) == 1:
        return f'{OPEN_TAG}\n{{"name": "{tools[0]["function"]["name"]}", "arguments": '
    return f'{OPEN_TAG}\n{{"name": "' if tool_choice == "required" else ""


def messages_for_template(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> what HF chat templates expect (tool-call arguments as objects)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                f = dict(c.get("function", {}))
                if isinstance(f.get("arguments"), str):
                    try:
                        f["arguments"] = json.loads(f["arguments"])
                    except json.JSONDecodeError:
                        pass
                calls.append({**c, "function": f})
            m["tool_calls"] = calls
        if m.get("content") is None:
            m["content"] = ""
        if isinstance(m["content"], list):  # content parts: keep the text ones
            m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
        out.append(m)
    return out
