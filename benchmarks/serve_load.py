"""Several streaming clients at once against `edgellm serve`: aggregate and per-client speed.

    python benchmarks/serve_load.py ART [--parallel 4] [--clients 1,2,4,8] [--max-tokens 96]
                                        [--threads 2] [--rounds 2] [--prefill-budget N]

Starts `edgellm serve ART --parallel P` on a free loopback port, then for each client count C
runs C threads of the official `openai` client at once, each streaming `rounds` requests in turn
(greedy, fixed max_tokens, prompts of its own below, a different one per client). Per
configuration: aggregate decode throughput (completion tokens of all clients over the wall time
from the first token to the last), per-client tok/s (its tokens after the first over the time
from its first token to its last, median over requests), time to first token p50 / p95, and
failed requests. Run `--parallel 1` for today's one-at-a-time serving on the same prompts.
First (unless --no-ceiling), the engine alone: one batched decode step of 1..P rows, in this
process before the server starts, and the throughput ratio that P full rows would give.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = [  # each answer alone (greedy, Qwen2.5-Coder-0.5B s8, ORT) has at least 96 tokens, so
    # every request decodes max_tokens and the table compares serving, not the answers' lengths
    # (in a batch, a near tie can end one a few tokens early)
    "Write a Python function that checks whether a string is a palindrome, with a docstring.",
    "Explain in a short paragraph how a hash map works.",
    "Write a Python class for a bank account with deposit, withdraw and a transaction history, "
    "with docstrings.",
    "Write a SQL query that returns the ten customers with the largest total order value.",
    "Explain step by step how a web browser loads a page, from typing the address to drawing it.",
    "Write a bash one-liner that counts the lines of every .py file in a directory tree.",
    "Explain how TCP's three-way handshake works and why it is needed.",
    "Explain what a race condition is and how a lock prevents it.",
]


def engine_ceiling(art: str, rows: int, threads: int, repeats: int = 20) -> list[float]:
    """Median ms of one batched decode step (`decode_rows`) of 1..rows slots, in this process
    and before the server starts: the most that batching can give, without any serving."""
    from decode_steps import step_ms  # (benchmarks/, this script's folder)
    from edgellm.runtime.generator import Generator

    engine = Generator.load(art, threads=threads, slots=rows).engine
    return [statistics.median(step_ms(engine, n, steps=1) for _ in range(repeats))
            for n in range(1, rows + 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(art: str, parallel: int, threads: int, port: int,
                 prefill_budget: int | None = None) -> subprocess.Popen:
    budget = ["--prefill-budget", str(prefill_budget)] if prefill_budget else []
    proc = subprocess.Popen([sys.executable, "-m", "edgellm", "serve", art, "--port", str(port),
                             "--parallel", str(parallel), "--threads", str(threads), "--quiet",
                             "--max-queue", "16", "--model-name", "m", *budget],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def server_metrics(port: int) -> dict:
    import httpx

    from edgellm.server.metrics import parse

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {k.removeprefix("edgellm_"): v for k, v in parse(text).items()}


def one_request(client, prompt: str, max_tokens: int) -> dict:
    t0 = time.monotonic()
    first, last, tokens = None, None, 0
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.monotonic()
            first = first or now
            last = now
    first, last = first or time.monotonic(), last or time.monotonic()
    return {"ttft": first - t0, "first": first, "last": last, "tokens": tokens,
            "tok_s": (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0}


def warm_up(port: int):
    from openai import OpenAI

    OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=4,
        temperature=0)


def run_clients(port: int, clients: int, rounds: int, max_tokens: int) -> dict:
    from openai import OpenAI

    results, failures = [], []

    def client_loop(i: int):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                        timeout=600)
        for r in range(rounds):
            try:
                results.append(one_request(client, PROMPTS[(i + r * clients) % len(PROMPTS)],
                                           max_tokens) | {"round": r})
            except Exception as e:  # counted, not raised: the table says how many failed
                failures.append(repr(e)[:200])

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not results:
        return {"clients": clients, "failed": len(failures), "errors": failures[:3]}
    start, end = min(r["first"] for r in results), max(r["last"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "clients": clients, "requests": len(results) + len(failures), "failed": len(failures),
        "aggregate_tok_s": sum(r["tokens"] for r in results) / (end - start),
        "per_client_tok_s": statistics.median(r["tok_s"] for r in results),
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p95_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        "errors": failures[:3],
        "tokens": sorted(r["tokens"] for r in results),
        "ttft_by_round": sorted((r["round"], round(1000 * r["ttft"])) for r in results),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--prefill-budget", type=int, default=None, help="serve's --prefill-budget")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip measuring the engine's batched step alone first")
    a = p.parse_args()
    if not a.no_ceiling and a.parallel > 1:
        ms = engine_ceiling(a.artifact, a.parallel, a.threads)
        print("engine alone, one decode step of " + ", ".join(
            f"{n} rows {t:.1f} ms" for n, t in enumerate(ms, 1))
            + f": {a.parallel} rows give {a.parallel * ms[0] / ms[-1]:.2f}x one row's tokens/s")
    port = free_port()
    server = start_server(a.artifact, a.parallel, a.threads, port, a.prefill_budget)
    try:
        # warm-up: one short request per slot at once, none of the prompts below, so every
        # slot holds the chat template's system prefix and no request finds its prompt cached
        warm = [threading.Thread(target=warm_up, args=(port,)) for _ in range(a.parallel)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        print("| --parallel | clients | requests | failed | aggregate tok/s | per-client tok/s "
              "| TTFT p50 | TTFT p95 | mean batch |")
        print("|---|---|---|---|---|---|---|---|---|")
        for clients in (int(c) for c in a.clients.split(",")):
            before = server_metrics(port)
            r = run_clients(port, clients, a.rounds, a.max_tokens)
            after = server_metrics(port)
            steps = after["batch_steps_total"] - before["batch_steps_total"]
            tokens = after["completion_tokens_total"] - before["completion_tokens_total"]
            batch = f"{tokens / steps:.2f}" if steps else "1 (not batched)"
            if "aggregate_tok_s" not in r:
                print(f"| {a.parallel} | {clients} | all failed: {r['errors']} |")
                continue
            print(f"| {a.parallel} | {clients} | {r['requests']} | {r['failed']} "
                  f"| {r['aggregate_tok_s']:.1f} | {r['per_client_tok_s']:.1f} "
                  f"| {r['ttft_p50_ms']:.0f} ms | {r['ttft_p95_ms']:.0f} ms | {batch} |",
                  flush=True)
            print("  completion tokens per request:", r["tokens"], file=sys.stderr)
            print("  TTFT ms by round:", r["ttft_by_round"], file=sys.stderr)
            if r["errors"]:
                print("  errors:", r["errors"], file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
