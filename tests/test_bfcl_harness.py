"""benchmarks/bfcl.py scores with BFCL's own data and AST checker: a right call passes, a wrong
one fails with the checker's reason, an answer in words is no call, and in the irrelevance
categories any call fails. A fake client stands in for the server, so no model runs here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bfcl  # noqa: E402  (benchmarks/bfcl.py; bfcl-eval itself is installed by .ci/run)


class FakeClient:
    """Answers every request with one message: calls (name, arguments) or text."""

    def __init__(self, calls=(), text=None):
        message = SimpleNamespace(content=text, tool_calls=[
            SimpleNamespace(function=SimpleNamespace(name=n, arguments=json.dumps(a)))
            for n, a in calls] or None)
        self.sent = []

        def create(**request):
            self.sent.append(request)
            return SimpleNamespace(choices=[SimpleNamespace(message=message)])

        self.chat = SimpleNamespace(completions=SimpleNamespace(create=create))


def _right_arguments(truth: dict) -> dict:
    """One answer BFCL accepts: each parameter's first acceptable value ("" means: leave out)."""
    return {param: values[0] for param, values in truth.items() if values[0] != ""}


def _score(client, category):
    tools, check = bfcl._bfcl()
    (entry, truth), = bfcl.sample(category, 1, 0)
    return bfcl.run_one(client, "m", entry, truth, category, tools, check, 64), entry, truth


def test_a_right_call_passes_and_a_wrong_one_fails_with_the_checkers_reason():
    _, entry, truth = _score(FakeClient(text="x"), "simple_python")
    (name, accepted), = truth[0].items()
    right = _right_arguments(accepted)
    result, _, _ = _score(FakeClient([(name, right)]), "simple_python")
    assert result == {"valid": True, "why": None, "calls": [{name: right}]}

    param = next(p for p, v in accepted.items() if isinstance(v[0], str) and v[0])
    wrong = {**right, param: "certainly not " + accepted[param][0]}
    result, _, _ = _score(FakeClient([(name, wrong)]), "simple_python")
    assert result["valid"] is False and param in result["why"], result

    result, _, _ = _score(FakeClient(text="I would call a function."), "simple_python")
    assert result == {"valid": False, "why": "no call; text: 'I would call a function.'"}

    client = FakeClient([(name, right)])
    _score(client, "simple_python")  # what the server is sent: BFCL's tools, as OpenAI tools
    (request,) = client.sent
    assert request["tool_choice"] == "auto" and request["temperature"] == 0
    assert [t["function"]["name"] for t in request["tools"]] == [name]


def test_in_the_irrelevance_categories_any_call_fails():
    result, entry, _ = _score(FakeClient(text="No tool here can answer that."), "irrelevance")
    assert result == {"valid": True, "why": None}
    name = entry["function"][0]["name"].replace(".", "_")
    result, _, _ = _score(FakeClient([(name, {})]), "irrelevance")
    assert result["valid"] is False and "where no tool fits" in result["why"]
