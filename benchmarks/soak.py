"""A bounded soak of `edgellm serve`: hundreds of requests mixing streams, disconnects, client
timeouts and bad bodies, from a few threads at once; then the server must be idle (queue depth 0),
its memory near where it settled, and a normal request answered.

    python benchmarks/soak.py ARTIFACT [--requests 600] [--clients 4] [--json]

The server runs as a subprocess (`edgellm serve --port 0 --quiet`); its RSS is read from /proc.
Exit status 1 if any request got a 5xx, a stream ended without [DONE] or an error event, the
queue did not drain, or RSS grew by more than 10% after warming up.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HELLO = [{"role": "user", "content": "Tell me about the sea."}]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(artifact: str) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", artifact, "--port",
                             "0", "--quiet", "--max-queue", "8"],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "OpenAI API" in line:
            host, port = line.split()[2].removeprefix("http://").removesuffix("/v1").split(":")
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, host, int(port)
    raise SystemExit(f"the server did not start: exit {proc.wait()}")


def _body(model: str, rng: random.Random, kind: str) -> bytes:
    body = {"model": model, "messages": HELLO, "max_tokens": rng.choice([4, 16, 64, 300])}
    if kind == "stream":
        body["stream"] = True
    if kind == "bad":
        return rng.choice([b"{not json", b'{"model": "%s", "messages": []}' % model.encode(),
                           b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}'
                           % model.encode(),
                           b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], '
                           b'"temperature": NaN}' % model.encode(),
                           json.dumps({**body, "top_k": -3}).encode()])
    return json.dumps(body).encode()


def one_request(host: str, port: int, model: str, rng: random.Random) -> str:
    """Send one request of a random kind; return an outcome label ('fail: ...' on a defect)."""
    kind = rng.choice(["plain", "stream", "stream", "disconnect", "timeout", "bad"])
    conn = http.client.HTTPConnection(host, port, timeout=0.3 if kind == "timeout" else 120)
    try:
        conn.request("POST", "/v1/chat/completions", _body(model, rng, kind),
                     {"Content-Type": "application/json"})
        if kind == "disconnect":  # go away before (or while) the answer comes
            time.sleep(rng.random() * 0.2)
            conn.sock.shutdown(socket.SHUT_RDWR)
            return "disconnected"
        r = conn.getresponse()
        raw = r.read().decode()
    except (TimeoutError, socket.timeout):
        return "timed out (client)"
    finally:
        conn.close()
    if r.status >= 500:
        return f"fail: {r.status} {raw[:200]}"
    if r.status == 200 and kind == "stream":
        events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
        if not events or not (events[-1] == "[DONE]" or '"error"' in events[-1]):
            return f"fail: stream ended with {events[-1:]}"
    return f"{r.status}"


def metrics(host: str, port: int) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    from edgellm.server.metrics import parse

    return parse(text)


def soak(artifact: str, requests: int, clients: int, seed: int = 0) -> dict:
    proc, host, port = start_server(artifact)
    model = Path(artifact).name
    try:
        rng = random.Random(seed)
        run = lambda n: list(pool.map(  # noqa: E731
            lambda s: one_request(host, port, model, random.Random(s)),
            [rng.random() for _ in range(n)]))
        with ThreadPoolExecutor(clients) as pool:
            # the same mix, a fifth as long, first: the prefix cache's slots fill, the
            # server's threads and allocator arenas exist; the RSS after it is "settled"
            warm = run(max(20, requests // 5))
            settled = rss_mb(proc.pid)
            start = time.monotonic()
            outcomes = run(requests)
            seconds = time.monotonic() - start
        for _ in range(100):  # abandoned generations stop at their next step
            depth = metrics(host, port)["edgellm_queue_depth"]
            if depth == 0:
                break
            time.sleep(0.1)
        after = rss_mb(proc.pid)
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({"model": model, "messages": HELLO, "max_tokens": 4}).encode(),
                     {"Content-Type": "application/json"})
        answer = conn.getresponse()
        final = answer.status, json.loads(answer.read())["choices"][0]["message"]["role"]
        counts = Counter(o if not o.startswith("fail") else "fail" for o in warm + outcomes)
        return {"requests": len(warm) + requests, "seconds": round(seconds, 1), "outcomes": dict(counts),
                "failures": [o for o in warm + outcomes if o.startswith("fail")][:10],
                "queue_depth_after": depth, "rss_settled_mb": round(settled, 1),
                "rss_after_mb": round(after, 1), "final_request": list(final)}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    r = soak(a.artifact, a.requests, a.clients)
    ok = (not r["failures"] and r["queue_depth_after"] == 0 and r["final_request"][0] == 200
          and r["rss_after_mb"] <= 1.1 * r["rss_settled_mb"])
    print(json.dumps(r) if a.json else "\n".join(f"{k}: {v}" for k, v in r.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
