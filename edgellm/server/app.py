"""The OpenAI-compatible API's routes: one model; generation is the scheduler's (scheduler.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgellm.chat.constrained import TokenMask
from edgellm.chat.tools import ToolCallStream
from edgellm.errors import EdgeLLMError
from edgellm.runtime.cache_reuse import MIN_RUN as CACHE_REUSE
from edgellm.runtime.generator import GenerationResult, Generator
from edgellm.runtime.sampler import SamplingConfig
from edgellm.server import ollama
from edgellm.server.errors import APIError, error_body
from edgellm.server.metrics import render
from edgellm.server.scheduler import Scheduler
from edgellm.server.schemas import ChatRequest, CompletionRequest
from edgellm.server.steps import (FINISH, chat_message, checked_calls, checks_calls, encode_chat,
                                  grammar_mask, split_pieces, watched)
from edgellm.server.upstream import SERVED_BY, Upstream
from edgellm.text.reasoning import ReasoningStream

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("edgellm.server")


def _sampling(req) -> SamplingConfig:
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", code="unsupported_value", param="n")
    if req.presence_penalty or req.frequency_penalty:
        raise APIError(400, "presence_penalty and frequency_penalty are not supported; "
                            "edgellm has repetition_penalty", code="unsupported_value")
    try:
        return SamplingConfig(temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=req.top_p or 1.0,
                              seed=None if req.seed is None else req.seed % 2**64,
                              top_k=req.top_k or 0,
                              repetition_penalty=req.repetition_penalty or 1.0)
    except EdgeLLMError as e:  # the schema has checked each field; this is their combination
        raise APIError(400, str(e), code="invalid_value") from None


def _stops(req) -> tuple[str, ...]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop sequences", param="stop")
    return tuple(s for s in stops if s)


def _check_model(served_name: str, name: str):
    if name != served_name:
        raise APIError(404, f"the model {name!r} does not exist; this server has "
                            f"{served_name!r}", code="model_not_found", param="model")


def _usage(r: GenerationResult) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids),
            "total_tokens": r.prompt_tokens + len(r.token_ids)}


def _chunk(cid: str, model: str, delta: dict, finish=None, **extra) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _deltas(events: list[tuple]) -> list[dict]:
    """ToolCallStream events -> OpenAI stream deltas: content; a call's first delta with its
    index, id, type and name; then its arguments, fragment by fragment."""
    out = []
    for kind, *rest in events:
        if kind == "content":
            out.append({"content": rest[0]})
        elif kind == "call":
            index, call_id, fn = rest
            out.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                        "function": {"name": fn, "arguments": ""}}]})
        else:
            index, fragment = rest
            out.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
    return out


async def _stream_chat(served: Scheduler, name: str, req: ChatRequest, ids, prefix, tools,
                       sampling, stop, mask: TokenMask | None, inside: bool | None = None):
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    # tool calls stream as they are decoded when a grammar keeps them valid; unconstrained
    # ones are parsed whole (and checked) before anything of them is sent, and so is an answer
    # whose calls serve --check-calls asks the model about (tool_choice auto)
    checking = checks_calls(served, prefix, tools)
    calls = ToolCallStream(tools, req.parallel_tool_calls) if tools and mask and not checking \
        else None
    live = not tools or calls is not None
    running = served.stream(ids, sampling, req.max_completion_tokens or req.max_tokens, stop,
                            mask, pieces=live)

    thinking = ReasoningStream(inside) if inside is not None else None
    answer = prefix
    gone = threading.Event()  # the client went away: a --check-calls follow-up stops

    def deltas(piece: str | None) -> list[dict]:
        nonlocal answer
        out = []
        for kind, text in split_pieces(thinking, piece):
            if kind == "reasoning":
                out.append({"reasoning_content": text})
            elif calls is None:
                out.append({"content": text})
            else:
                answer += text
                out += _deltas(calls.feed(answer))
        return out

    async def events():
        try:
            yield _chunk(cid, name, {"role": "assistant", "content": ""})
            async for piece in running:
                for delta in deltas(piece):
                    yield _chunk(cid, name, delta)
            for delta in deltas(None) if live else ():
                yield _chunk(cid, name, delta)
            result = running.result()
            if checking:
                result = await checked_calls(served, req, ids, prefix, tools, result, sampling,
                                             req.max_completion_tokens or req.max_tokens, stop,
                                             gone)
            if calls is not None:
                for delta in _deltas(calls.finish()):
                    yield _chunk(cid, name, delta)
                finish = "tool_calls" if calls.calls and result.stop_reason != "length" \
                    else FINISH[result.stop_reason]
            else:
                message, finish = chat_message(result, prefix, tools, req.parallel_tool_calls,
                                               inside)
                if not live:
                    delta = {k: v for k, v in message.items() if k != "role"}
                    if delta.get("tool_calls"):
                        delta["tool_calls"] = [{"index": i, **c}
                                               for i, c in enumerate(delta["tool_calls"])]
                    yield _chunk(cid, name, delta)
            yield _chunk(cid, name, {}, finish)
            if (req.stream_options or {}).get("include_usage"):
                body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": name, "choices": [], "usage": _usage(result)}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps(error_body(e.message, e.kind, e.code, e.param))}\n\n"
        except Exception as e:  # a bug: the client still gets an error event, not a cut stream
            log.exception("stream failed")
            yield f"data: {json.dumps(_server_error(e))}\n\n"
        finally:
            running.cancel()  # a client that went away stops its generation
            gone.set()  # and its check's

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _body(req) -> dict:
    return req.model_dump(exclude_unset=True, exclude_none=True)


def _server_error(e: Exception) -> dict:
    return error_body(f"internal error ({type(e).__name__}); the server's log has the details",
                      "server_error", "internal_error")


def _add_routes(app: FastAPI, served: Scheduler, name: str, upstream: Upstream | None,
                tool_grammar: bool):
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model",
                                            "created": 0, "owned_by": "edgellm"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():  # the Prometheus text format (server.metrics)
        caches = [slot.prefix_cache for slot in served.slots]
        values = {**served.metrics,
                  "prefix_cache_slot_swaps_total": sum(c.swaps for c in caches),
                  "prefix_cache_moved_tokens_total": sum(c.moved for c in caches)}
        store = caches[0].store
        if store is not None:  # serve --prompt-cache
            values.update(prompt_cache_disk_hits_total=sum(c.disk_hits for c in caches),
                          prompt_cache_files=len(store.index),
                          prompt_cache_writes_total=store.saves)
        values.update(served.state(), kv_cache_bytes=served.gen.engine.kv_bytes())
        return PlainTextResponse(render(values), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        if upstream and req.model != name:
            return await upstream.forward("/chat/completions", _body(req), "model")
        _check_model(name, req.model)
        sampling, stop = _sampling(req), _stops(req)
        ids, prefix, tools, inside = encode_chat(served.gen, req, served.tool_system)
        if upstream and len(ids) >= served.gen.engine.kv_cache_len:
            return await upstream.forward("/chat/completions", _body(req), "context")
        served.check_context(ids)
        mask = await asyncio.get_running_loop().run_in_executor(
            None, grammar_mask, served, req, prefix, tools, tool_grammar)
        served.admit()
        if req.stream:
            return await _stream_chat(served, name, req, ids, prefix, tools, sampling, stop,
                                      mask, inside)
        cancel = threading.Event()
        limit = req.max_completion_tokens or req.max_tokens

        async def answer():
            result = await served.run(ids, sampling, limit, stop, cancel=cancel, mask=mask)
            return await checked_calls(served, req, ids, prefix, tools, result, sampling, limit,
                                       stop, cancel)

        result = await watched(request, answer(), cancel)
        message, finish = chat_message(result, prefix, tools, req.parallel_tool_calls, inside)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": _usage(result)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if upstream and req.model != name:
            return await upstream.forward("/completions", _body(req), "model")
        _check_model(name, req.model)
        if req.stream:
            raise APIError(400, "streaming is not supported on /v1/completions; use "
                                "/v1/chat/completions", param="stream")
        sampling, stop = _sampling(req), _stops(req)
        ids = served.gen.tokenizer.encode(req.prompt).ids
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        served.check_context(ids)
        served.admit()
        cancel = threading.Event()
        result = await watched(request, served.run(ids, sampling, req.max_tokens, stop,
                                                   cancel=cancel), cancel)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "text": result.text, "logprobs": None,
                             "finish_reason": FINISH[result.stop_reason]}],
                "usage": _usage(result)}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")


def _ollama_path(path: str) -> bool:
    """A route of the Ollama API (server.ollama), whose errors are {"error": "..."}."""
    return path.startswith("/api/")


def _error(path: str, status: int, body: dict, headers=None) -> JSONResponse:
    """An error in the shape of the API the path belongs to."""
    if _ollama_path(path):
        body = {"error": body["error"]["message"]}
    return JSONResponse(body, status, headers=headers)


def _add_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error(request.url.path, e.status, error_body(e.message, e.kind, e.code,
                                                             e.param), e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "invalid JSON body" if first.get("type") == "json_invalid" else \
            f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        param = None if first.get("type") == "json_invalid" else where
        return _error(request.url.path, 400, error_body(message, "invalid_request_error",
                                                        "invalid_request", param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error(request.url.path, e.status_code,
                      error_body(str(e.detail), "invalid_request_error"))

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):  # never plain-text "Internal Server Error"
        return _error(request.url.path, 500, _server_error(e))


class Guard:
    """ASGI middleware (a plain one: Starlette's BaseHTTPMiddleware hides a client's disconnect
    from the routes): the API key on every route but /health and /, and the served-by header."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] not in ("/health", "/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if given != f"Bearer {self.api_key}".encode():
                response = _error(scope["path"], 401, error_body(
                    "missing or wrong API key", "authentication_error", "invalid_api_key"))
                return await response(scope, receive, send)

        async def served_by(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == SERVED_BY.lower().encode() for k, _ in headers):
                    headers.append((SERVED_BY.lower().encode(), b"local"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, served_by)


class BodyLimit:
    """ASGI middleware: a request body over `max_body` bytes gets a 413 as soon as that many
    have come (a chunked upload is counted while it is read, never held whole)."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def _too_large(self, scope, receive, send):
        response = _error(scope["path"], 413, error_body(
            f"request body over {self.max_body} bytes", "invalid_request_error",
            "body_too_large"), {"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_body:
                return await self._too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, total = [], 0
        while True:  # no length given (chunked): read, counting, up to the limit
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            total += len(message.get("body", b""))
            if total > self.max_body:
                return await self._too_large(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(gen: Generator, model_name: str, api_key: str | None = None,
               max_queue: int = 8, max_body: int = 1 << 20, cache_slots: int = 4,
               upstream: Upstream | None = None, tool_grammar: bool = True,
               speculate: str = "auto", prefill_budget: int | None = None,
               prompt_store=None, cache_reuse: int = CACHE_REUSE,
               tool_system: str | None = None, check_calls: float | None = None,
               grammar_build=None) -> FastAPI:
    """The ASGI app serving `gen` as `model_name` (other models / long prompts to `upstream`).
    `tool_grammar` False leaves `tool_choice` auto unconstrained (to measure what the lazy
    grammar is worth). `prefill_budget`: runtime.batch's prefill policy (None: one chunk).
    `prompt_store`: a runtime.prompt_store.PromptStore, long prefixes kept on disk.
    `cache_reuse`: the shortest run of a cached prompt moved past a change (0: off).
    `tool_system`: the system message of requests that offer tools without one of their own.
    `check_calls`: the p(yes) a call of tool_choice auto must get when the model is asked
    whether it fits (steps.checked_calls; None: not asked). `grammar_build`: a Future of the
    model's chat.constrained.ToolCallGrammar under way (else the first request that needs a
    mask makes it)."""
    served = Scheduler.batched(gen, max_queue, cache_slots, speculate=speculate,
                               prefill_budget=prefill_budget, store=prompt_store,
                               reuse=cache_reuse, tool_system=tool_system,
                               check_calls=check_calls, grammar_build=grammar_build)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        served.open()
        yield
        served.close()  # shutting down: running and queued generations stop at their next step
        await asyncio.get_running_loop().run_in_executor(None, served.finish_writes)

    app = FastAPI(title="edgellm", version="0.1.0", lifespan=lifespan)
    app.state.served = served
    _add_routes(app, served, model_name, upstream, tool_grammar)
    ollama.add_routes(app, served, model_name, tool_grammar, gen.artifact)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_body=max_body)
    app.add_middleware(Guard, api_key=api_key)  # outermost: the key before the body
    return app
