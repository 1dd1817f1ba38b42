"""The Berkeley Function Calling Leaderboard's single-turn categories through OpenAI-compatible
servers, with BFCL's own data, tool conversion and AST checker: per-category accuracy of a seeded
sample, and every failure with its reason. Servers are started here (edgellm serve, llama.cpp's
llama-server) or given by URL; each is one column of the table.

    pip install --no-deps -c constraints.txt bfcl-eval tree-sitter tree-sitter-java \\
        tree-sitter-javascript tenacity filelock        # as .ci/run does
    python benchmarks/bfcl.py --edgellm ART [--edgellm ART2 ...] [--llama-server BIN --gguf GGUF]
                              [--url URL --model NAME] [--per-category 8] [--seed 0]
                              [--categories simple_python,...] [--failures FILE.jsonl]

bfcl-eval's full dependency list pulls in torch and a dozen vendor SDKs: only its data, its
tool conversion (model_handler.utils, which needs tree_sitter for its Java/JS parsers) and its
checker are used. The checker imports bfcl's table of every model it knows (and with it every
vendor SDK) for one flag, whether "." in a function name was sent as "_": that module is replaced
here by the answer for OpenAI-style function calling (yes), which is what both servers get.
Requests: the category's messages, its functions as OpenAI tools, tool_choice auto,
temperature 0, max_tokens 512 (--max-tokens); a call is [{name: arguments}] as BFCL's OpenAI FC handler decodes it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
import types
from collections import defaultdict
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance",
              "live_simple", "live_multiple", "live_parallel", "live_irrelevance"]
VERSION = "BFCL_v4"


def _bfcl():
    """BFCL's checker and tool conversion, without its table of every vendor's model."""
    stub = types.ModuleType("bfcl_eval.constants.model_config")
    stub.MODEL_CONFIG_MAPPING = defaultdict(lambda: SimpleNamespace(underscore_to_dot=True))
    sys.modules.setdefault("bfcl_eval.constants.model_config", stub)
    from bfcl_eval.constants.enums import Language, ModelStyle
    from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    from bfcl_eval.model_handler.utils import convert_to_tool

    def tools(functions):
        return convert_to_tool(functions, GORILLA_TO_OPENAPI, ModelStyle.OPENAI_COMPLETIONS)

    def check(functions, decoded, answer, category):
        return ast_checker(functions, decoded, answer, Language.PYTHON, category, "edgellm")

    return tools, check


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample(category: str, per_category: int | None, seed: int) -> list[tuple[dict, list]]:
    """(entry, ground truth or None) pairs: a seeded sample of the category, in id order."""
    data = resources.files("bfcl_eval") / "data"
    entries = _lines(data / f"{VERSION}_{category}.json")
    answers = data / "possible_answer" / f"{VERSION}_{category}.json"
    truth = {a["id"]: a["ground_truth"] for a in _lines(answers)} if answers.is_file() else {}
    if per_category and per_category < len(entries):
        entries = random.Random(f"{seed}:{category}").sample(entries, per_category)
    entries.sort(key=lambda e: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)",
                                                                                 e["id"])])
    return [(e, truth.get(e["id"])) for e in entries]


def run_one(client, model: str, entry: dict, truth, category: str, tools, check,
            max_tokens: int) -> dict:
    """One case: its verdict and, when it failed, why."""
    import openai

    messages = entry["question"][0]
    try:
        r = client.chat.completions.create(model=model, messages=messages,
                                           tools=tools(entry["function"]), temperature=0,
                                           tool_choice="auto", max_tokens=max_tokens)
    except openai.APIStatusError as e:
        return {"valid": False, "why": f"HTTP {e.status_code}: {str(e.message)[:200]}"}
    except openai.APIConnectionError as e:  # a timeout included
        return {"valid": False, "why": f"no answer ({type(e).__name__})"}
    message = r.choices[0].message
    calls = message.tool_calls or []
    if "irrelevance" in category:
        return {"valid": not calls, "why": None if not calls else
                f"called {', '.join(c.function.name for c in calls)} where no tool fits"}
    if not calls:
        return {"valid": False, "why": f"no call; text: {(message.content or '')[:160]!r}"}
    try:
        decoded = [{c.function.name: json.loads(c.function.arguments)} for c in calls]
    except ValueError:
        return {"valid": False, "why": "arguments are not JSON"}
    verdict = check(entry["function"], decoded, truth, category)
    why = None if verdict["valid"] else f"{verdict.get('error_type')}: " \
        f"{'; '.join(map(str, verdict.get('error', [])))[:200]}"
    return {"valid": verdict["valid"], "why": why, "calls": decoded}


def evaluate(url: str, model: str, categories, per_category, seed, failures=None,
             max_tokens: int = 512) -> dict:
    import openai

    tools, check = _bfcl()
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    scores = {}
    for category in categories:
        passed, cases = 0, sample(category, per_category, seed)
        for entry, truth in cases:
            result = run_one(client, model, entry, truth, category, tools, check, max_tokens)
            passed += result["valid"]
            if failures is not None and not result["valid"]:
                failures.write(json.dumps({"server": url, "model": model, "category": category,
                                           "id": entry["id"], **result}) + "\n")
                failures.flush()
        scores[category] = (passed, len(cases))
        print(f"  {category}: {passed}/{len(cases)}", file=sys.stderr, flush=True)
    return scores


class Server:
    """A server started here, its OpenAI base URL once it answers; stopped on exit."""

    def __init__(self, command: list[str], port: int, name: str):
        self.name, self.url = name, f"http://127.0.0.1:{port}/v1"
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        import httpx

        for _ in range(600):
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"{self.name} did not start")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edgellm", action="append", default=[], metavar="ART",
                   help="start `edgellm serve ART` and run it (repeatable)")
    p.add_argument("--edgellm-args", default="", help="more `edgellm serve` arguments")
    p.add_argument("--llama-server", metavar="BIN", help="llama.cpp's server binary")
    p.add_argument("--gguf", action="append", default=[], help="a GGUF for --llama-server "
                   "(repeatable), started with --jinja")
    p.add_argument("--ctx-size", type=int, default=4096,
                   help="the context both servers run with (default 4096)")
    p.add_argument("--url", action="append", default=[], help="a running server's /v1 URL")
    p.add_argument("--model", default="model", help="the model name for --url servers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-category", type=int, default=8, help="0: every case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=512,
                   help="per answer, on every server (a rambling answer fails either way)")
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--failures", help="write every failure and its reason to this JSONL file")
    a = p.parse_args()
    categories = a.categories.split(",")
    failures = open(a.failures, "w") if a.failures else None
    columns = {}
    runs = [(f"edgellm {Path(art).name}", [sys.executable, "-m", "edgellm.cli", "serve", art,
                                          "--model-name", "model", "--threads",
                                          str(a.threads), "--ctx-size", str(a.ctx_size),
                                          "--parallel", "1", "--quiet",
                                          *a.edgellm_args.split()]) for art in a.edgellm]
    runs += [(f"llama.cpp {Path(g).name}", [a.llama_server, "-m", g, "--jinja", "-c",
                                            str(a.ctx_size), "-t", str(a.threads), "-np", "1",
                                            "--alias", "model"]) for g in a.gguf]
    for name, command in runs:
        port = _free_port()
        command = command + (["--port", str(port)] if "edgellm.cli" in command else
                             ["--port", str(port), "--host", "127.0.0.1"])
        print(name, file=sys.stderr, flush=True)
        with Server(command, port, name) as server:
            columns[name] = evaluate(server.url, "model", categories, a.per_category or None,
                                     a.seed, failures, a.max_tokens)
    for url in a.url:
        print(url, file=sys.stderr, flush=True)
        columns[url] = evaluate(url, a.model, categories, a.per_category or None, a.seed,
                                failures, a.max_tokens)
    names = list(columns)
    print("| category | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for category in categories:
        print(f"| {category} | " + " | ".join(f"{columns[n][category][0]}/"
                                               f"{columns[n][category][1]}" for n in names) + " |")
    totals = [sum(columns[n][c][0] for c in categories) for n in names]
    cases = [sum(columns[n][c][1] for c in categories) for n in names]
    print("| all | " + " | ".join(f"{t}/{c}" for t, c in zip(totals, cases)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
