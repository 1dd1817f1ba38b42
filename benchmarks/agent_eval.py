"""How well a small model works as an agent through `edgellm serve`'s OpenAI API.

    python benchmarks/agent_eval.py [--models qwen2.5-coder-0.5b-instruct,...] [--markdown]

44 cases over six tools whose parameters are flat, an enum, integer ranges, an array of objects
and a nested object: requests that need one call, two calls (parallel), no call, and two-step
round trips (call -> tool result -> an answer that must use the result). Each model (pulled and
built as s8 in the cache, like `edgellm demo`) runs them greedily with tool_choice `auto` (the lazy
grammar on, and off: `serve --no-tool-grammar`) and `required` (always under the grammar; no-call
cases do not apply). Per configuration it counts:

- valid: call cases whose answer carried calls the server passed on (every one validates against
  its schema: the server drops invalid ones and says why in `tool_call_error`);
- lost: call cases where the model wrote a call that the server rejected (invalid arguments);
- function: call cases whose first call names the expected function;
- arguments: call cases whose calls carry every expected argument (strings compared loosely);
- no call: no-call cases answered as text (auto only);
- parallel: two-call cases with both calls right;
- round trip: round-trip cases with the right call and a final answer quoting the tool's result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "set_alarm", "description": "Set an alarm clock",
        "parameters": {"type": "object", "properties": {
            "hour": {"type": "integer", "minimum": 0, "maximum": 23},
            "minute": {"type": "integer", "minimum": 0, "maximum": 59},
            "label": {"type": "string"}},
            "required": ["hour", "minute"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add_to_cart", "description": "Add products to the shopping cart",
        "parameters": {"type": "object", "properties": {
            "items": {"type": "array", "minItems": 1, "items": {
                "type": "object", "properties": {
                    "product": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1}},
                "required": ["product", "quantity"], "additionalProperties": False}}},
            "required": ["items"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "create_event", "description": "Create a calendar event",
        "parameters": {"type": "object", "properties": {
            "title": {"type": "string"},
            "start": {"type": "object", "properties": {
                "date": {"type": "string", "description": "YYYY-MM-DD"},
                "time": {"type": "string", "description": "HH:MM, 24-hour"}},
                "required": ["date", "time"], "additionalProperties": False},
            "attendees": {"type": "array", "items": {"type": "string"}}},
            "required": ["title", "start"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"},
            "from_currency": {"type": "string", "description": "ISO code, e.g. USD"},
            "to_currency": {"type": "string", "description": "ISO code, e.g. EUR"}},
            "required": ["amount", "from_currency", "to_currency"],
            "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_web", "description": "Search the web for recent information",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"], "additionalProperties": False}}},
]


def one(question, name, **args):
    return {"kind": "one", "q": question, "calls": [(name, args)]}


def two(question, *calls):
    return {"kind": "two", "q": question, "calls": list(calls)}


def none(question):
    return {"kind": "none", "q": question, "calls": []}


def trip(question, name, args, result, expect):
    return {"kind": "trip", "q": question, "calls": [(name, args)], "result": result,
            "expect": expect}


CASES = [
    one("What is the weather in Paris in celsius?", "get_weather", city="Paris", unit="celsius"),
    one("How warm is it in Oslo right now? Use fahrenheit.", "get_weather", city="Oslo",
        unit="fahrenheit"),
    one("Is it raining in Tokyo? Answer in celsius.", "get_weather", city="Tokyo"),
    one("Weather for Berlin please, metric units.", "get_weather", city="Berlin"),
    one("Check the weather in Cairo.", "get_weather", city="Cairo"),
    one("Set an alarm for 7:30.", "set_alarm", hour=7, minute=30),
    one("Wake me up at 6 am.", "set_alarm", hour=6, minute=0),
    one("Set an alarm at 22:15 labelled 'take pills'.", "set_alarm", hour=22, minute=15),
    one("I need an alarm at half past eight in the morning.", "set_alarm", hour=8, minute=30),
    one("Add 3 apples to my cart.", "add_to_cart",
        items=[{"product": "apple", "quantity": 3}]),
    one("Put 2 bottles of milk and 1 loaf of bread in the cart.", "add_to_cart"),
    one("Please add one laptop to the shopping cart.", "add_to_cart",
        items=[{"product": "laptop", "quantity": 1}]),
    one("Create an event 'Team sync' on 2026-12-03 at 10:00.", "create_event",
        title="Team sync", start={"date": "2026-12-03", "time": "10:00"}),
    one("Schedule 'Dentist' for 2026-12-10 at 15:30.", "create_event", title="Dentist",
        start={"date": "2026-12-10", "time": "15:30"}),
    one("Make a calendar event called Lunch with Ana and Bo on 2026-12-05 at 12:00.",
        "create_event", start={"date": "2026-12-05", "time": "12:00"}),
    one("Convert 100 USD to EUR.", "convert_currency", amount=100, from_currency="USD",
        to_currency="EUR"),
    one("How many yen is 50 British pounds?", "convert_currency", amount=50,
        from_currency="GBP", to_currency="JPY"),
    one("Change 20.5 euros into Swiss francs.", "convert_currency", amount=20.5,
        from_currency="EUR", to_currency="CHF"),
    one("Search the web for the latest Python release.", "search_web"),
    one("Look up recent news about the Mars rover.", "search_web"),
    one("Find out who won yesterday's football match between Spain and Italy.", "search_web"),
    one("What's the weather like in Lisbon? Celsius.", "get_weather", city="Lisbon",
        unit="celsius"),
    two("What is the weather in Paris and in Tokyo, in celsius?",
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})),
    two("Convert 100 USD to EUR and 50 GBP to JPY.",
        ("convert_currency", {"amount": 100, "from_currency": "USD", "to_currency": "EUR"}),
        ("convert_currency", {"amount": 50, "from_currency": "GBP", "to_currency": "JPY"})),
    two("Set two alarms: 7:00 and 7:30.", ("set_alarm", {"hour": 7, "minute": 0}),
        ("set_alarm", {"hour": 7, "minute": 30})),
    two("Check the weather in Rome in celsius and search the web for Rome museums.",
        ("get_weather", {"city": "Rome"}), ("search_web", {})),
    two("Set an alarm for 6:45 and add 2 coffees to my cart.",
        ("set_alarm", {"hour": 6, "minute": 45}),
        ("add_to_cart", {"items": [{"product": "coffee", "quantity": 2}]})),
    two("Weather in Madrid and in Athens, fahrenheit please.",
        ("get_weather", {"city": "Madrid"}), ("get_weather", {"city": "Athens"})),
    none("Write a haiku about the sea."),
    none("What is the capital of France?"),
    none("Explain recursion in one sentence."),
    none("Print a JSON object with a name and an age for a person called Alice."),
    none("Translate 'good morning' into Spanish."),
    none("Write a Python function that reverses a string."),
    none("What is 12 times 12?"),
    none("Tell me a joke about cats."),
    none("Give me three tips for better sleep."),
    none("Who wrote Pride and Prejudice?"),
    trip("What is the weather in Paris in celsius?", "get_weather", {"city": "Paris"},
         "17 degrees celsius and light rain", "17"),
    trip("Convert 100 USD to EUR.", "convert_currency", {"amount": 100},
         "100 USD = 92.40 EUR", "92.4"),
    trip("Set an alarm for 7:30.", "set_alarm", {"hour": 7, "minute": 30},
         "Alarm set for 07:30 (id 4411).", "7:30"),
    trip("Search the web for the tallest building in the world.", "search_web", {},
         "The Burj Khalifa in Dubai is the tallest building at 828 m.", "Burj Khalifa"),
    trip("How many yen is 50 British pounds?", "convert_currency", {"amount": 50},
         "50 GBP = 9,650 JPY", "9,650"),
    trip("Is it raining in Tokyo? Celsius.", "get_weather", {"city": "Tokyo"},
         "Tokyo: 22 degrees celsius, clear sky, no rain.", "22"),
]
MODELS = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"]
CONFIGS = [("auto", True), ("auto", False), ("required", True)]


def _loose(value):
    return value.lower().strip().rstrip("s") if isinstance(value, str) else value


def _matches(expected, got) -> bool:
    """Every expected argument is there (strings loosely: case, a plural s); lists and
    objects recursively."""
    if isinstance(expected, dict):
        return isinstance(got, dict) and all(k in got and _matches(v, got[k])
                                             for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and \
            all(_matches(e, g) for e, g in zip(expected, got))
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        return abs(expected - got) < 1e-6
    return _loose(expected) == _loose(got)


def _post(client, body: dict) -> dict:
    r = client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
    return r.json()["choices"][0]


def run_case(client, model: str, case: dict, choice: str, system: str | None = None) -> dict:
    first = [{"role": "system", "content": system}] if system else []
    body = {"model": model, "messages": first + [{"role": "user", "content": case["q"]}],
            "tools": TOOLS, "tool_choice": choice, "temperature": 0, "max_tokens": 160}
    answer = _post(client, body)
    message = answer["message"]
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in message.get("tool_calls") or []]
    row = {"calls": calls, "lost": "tool_call_error" in message,
           "text": (message.get("content") or "")[:120]}
    wanted = case["calls"]
    row["function"] = bool(calls) and bool(wanted) and calls[0][0] == wanted[0][0]
    row["arguments"] = bool(wanted) and len(calls) >= len(wanted) and all(
        any(n == name and _matches(args, got) for n, got in calls) for name, args in wanted)
    if case["kind"] == "trip" and calls:
        call = message["tool_calls"][0]
        follow = body | {"tool_choice": "auto", "messages": body["messages"] + [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": case["result"]}]}
        final = _post(client, follow)["message"]
        row["final"] = (final.get("content") or "")[:160]
        row["trip"] = row["function"] and not final.get("tool_calls") and \
            case["expect"].lower() in row["final"].lower()
    return row


def evaluate(model: str, cases=CASES, configs=CONFIGS, system: str | None = None,
             check_calls: float | None = None) -> dict:
    from starlette.testclient import TestClient

    from edgellm.demo import cached_artifact
    from edgellm.runtime.generator import Generator
    from edgellm.server.app import create_app

    gen = Generator.load(cached_artifact(model), threads=2)
    results = {}
    for choice, grammar in configs:
        with TestClient(create_app(gen, model, tool_grammar=grammar,
                                   check_calls=check_calls)) as client:
            start = time.monotonic()
            rows = [(case, run_case(client, model, case, choice, system)) for case in cases
                    if not (choice == "required" and case["kind"] == "none")]
            results[(choice, grammar)] = summarize(rows, time.monotonic() - start)
            results[(choice, grammar)]["rows"] = rows
    return results


def summarize(rows, seconds: float) -> dict:
    need = [r for c, r in rows if c["kind"] != "none"]
    count = lambda xs, key: sum(1 for r in xs if r.get(key))  # noqa: E731
    by = lambda kind: [r for c, r in rows if c["kind"] == kind]  # noqa: E731
    return {
        "valid": (sum(1 for r in need if r["calls"]), len(need)),
        "lost": (sum(1 for r in need if r["lost"]), len(need)),
        "function": (count(need, "function"), len(need)),
        "arguments": (count(need, "arguments"), len(need)),
        "no call": (sum(1 for r in by("none") if not r["calls"]), len(by("none"))),
        "parallel": (count(by("two"), "arguments"), len(by("two"))),
        "round trip": (count(by("trip"), "trip"), len(by("trip"))),
        "seconds": round(seconds),
    }


COLUMNS = ["valid", "lost", "function", "arguments", "no call", "parallel", "round trip"]


def table(all_results: dict) -> str:
    lines = ["| model | tool_choice | lazy grammar | " + " | ".join(COLUMNS) + " | time |",
             "|---|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for model, results in all_results.items():
        for (choice, grammar), r in results.items():
            cells = [f"{r[k][0]}/{r[k][1]}" if r[k][1] else "n/a" for k in COLUMNS]
            grammar_cell = "on" if grammar else "off"
            lines.append(f"| {model} | {choice} | {grammar_cell if choice == 'auto' else 'forced'}"
                         f" | " + " | ".join(cells) + f" | {r['seconds']} s |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--details", action="store_true", help="print every case's answer")
    p.add_argument("--configs", default="auto-on,auto-off,required",
                   help="which of auto-on, auto-off, required to run")
    p.add_argument("--system", help="a system message sent before every request")
    p.add_argument("--check-calls", type=float, metavar="P",
                   help="as `serve --check-calls P`: each auto call asked about")
    a = p.parse_args()
    kinds = {k: sum(1 for c in CASES if c["kind"] == k) for k in ("one", "two", "none", "trip")}
    print(f"{len(CASES)} cases: {kinds}; {len(TOOLS)} tools", file=sys.stderr)
    all_results = {}
    for model in a.models.split(","):
        configs = [c for c, name in zip(CONFIGS, ("auto-on", "auto-off", "required"))
                   if name in a.configs.split(",")]
        all_results[model] = evaluate(model, configs=configs, system=a.system,
                                      check_calls=a.check_calls)
        if a.details:
            for config, r in all_results[model].items():
                for case, row in r["rows"]:
                    print(model, config, case["q"], "->", row, file=sys.stderr)
        print(table({model: all_results[model]}), file=sys.stderr)
    print(table(all_results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
