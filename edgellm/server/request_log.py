"""One log line per request of `edgellm serve`: method, path, status, tokens, seconds; a
response that did not reach its end (a client that left mid-stream, a dropped connection) is
marked `cut`."""

from __future__ import annotations

import contextvars
import sys
import time

# the request being answered: its log entry, which the generation fills with its token counts
_current: contextvars.ContextVar[dict | None] = contextvars.ContextVar("edgellm_request",
                                                                        default=None)


def note_tokens(prompt: int, completion: int):
    """Count one generation's tokens towards the current request's log line."""
    entry = _current.get()
    if entry is not None:
        entry["prompt"] += prompt
        entry["completion"] += completion


class RequestLog:
    """ASGI middleware: one line per request (method, path, status, tokens, seconds) once its
    response, streamed or not, has been sent."""

    def __init__(self, app, out=sys.stderr):
        self.app, self.out = app, out

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        entry = {"prompt": 0, "completion": 0, "status": None, "logged": False, "ended": False}
        start = time.perf_counter()

        def log():
            if entry["logged"]:
                return
            entry["logged"] = True
            tokens = (f" {entry['prompt']}+{entry['completion']} tokens"
                      if entry["prompt"] or entry["completion"] else "")
            status = entry["status"] or "disconnected"
            if entry["status"] and not entry["ended"]:
                status = f"{status} cut"
            print(f"{time.strftime('%H:%M:%S')} {scope['method']} {scope['path']} "
                  f"{status}{tokens} "
                  f"{time.perf_counter() - start:.2f} s", file=self.out, flush=True)

        async def logged_send(message):
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                entry["ended"] = True
                log()

        token = _current.set(entry)
        try:
            await self.app(scope, receive, logged_send)
        finally:
            _current.reset(token)
            log()
