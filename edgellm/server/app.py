"""The OpenAI-compatible API's routes: one model; generation is the scheduler's (scheduler.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgellm.chat.constrained import TokenMask
from edgellm.chat.tools import forced_prefix, messages_for_template, parse_tool_calls
from edgellm.errors import EdgeLLMError
from edgellm.runtime.generator import GenerationResult, Generator
from edgellm.runtime.prefix_cache import PrefixCache
from edgellm.runtime.sampler import SamplingConfig
from edgellm.server.errors import APIError, error_body
from edgellm.server.scheduler import Scheduler
from edgellm.server.schemas import ChatRequest, CompletionRequest
from edgellm.server.upstream import SERVED_BY, Upstream

STATIC = Path(__file__).parent / "static"
FINISH = {"eos": "stop", "stop": "stop", "cancelled": "stop", "length": "length",
          "kv_cache_full": "length"}


def _sampling(req) -> SamplingConfig:
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", code="unsupported_value", param="n")
    if req.presence_penalty or req.frequency_penalty:
        raise APIError(400, "presence_penalty and frequency_penalty are not supported; "
                            "edgellm has repetition_penalty", code="unsupported_value")
    extra = req.model_extra or {}
    try:
        return SamplingConfig(temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=req.top_p or 1.0, seed=req.seed,
                              top_k=int(extra.get("top_k", 0)),
                              repetition_penalty=float(extra.get("repetition_penalty", 1.0)))
    except (EdgeLLMError, TypeError, ValueError) as e:
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


def _encode_chat(gen: Generator, req: ChatRequest) -> tuple[list[int], str, list[dict]]:
    """Prompt ids, the forced start of the answer (tool_choice), and the active tools."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names an unknown function {name!r}",
                           param="tool_choice")
    active = tools if choice != "none" else []
    messages = messages_for_template([m.model_dump(exclude_none=True) for m in req.messages])
    if gen.template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions")
    if active and "tools" not in gen.template.source:
        raise APIError(400, "this model's chat template does not render tools", param="tools")
    try:
        text = gen.template.render(messages, add_generation_prompt=True, tools=active or None)
    except EdgeLLMError as e:
        raise APIError(400, str(e)) from None
    prefix = forced_prefix(choice, active) if active else ""
    ids = gen.tokenizer.encode(text + prefix, add_special_tokens=False).ids
    return ids, prefix, active


def _usage(r: GenerationResult) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids),
            "total_tokens": r.prompt_tokens + len(r.token_ids)}


def _chat_message(r: GenerationResult, prefix: str, tools: list[dict]) -> tuple[dict, str]:
    if not tools:
        return {"role": "assistant", "content": r.text}, FINISH[r.stop_reason]
    parsed = parse_tool_calls(prefix + r.text, tools)
    if parsed.calls:
        return ({"role": "assistant", "content": parsed.content or None,
                 "tool_calls": parsed.calls}, "tool_calls")
    message = {"role": "assistant", "content": prefix + r.text}
    if parsed.error:
        message["tool_call_error"] = parsed.error  # reported, not passed on as a call
    return message, FINISH[r.stop_reason]


def _chunk(cid: str, model: str, delta: dict, finish=None, **extra) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream_chat(served: Scheduler, name: str, req: ChatRequest, ids, prefix, tools,
                       sampling, stop, mask: TokenMask | None):
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    live = not tools  # tool answers are parsed whole, then sent
    running = served.stream(ids, sampling, req.max_completion_tokens or req.max_tokens, stop,
                            mask, pieces=live)

    async def events():
        try:
            yield _chunk(cid, name, {"role": "assistant", "content": ""})
            async for piece in running:
                yield _chunk(cid, name, {"content": piece})
            result = running.result()
            message, finish = _chat_message(result, prefix, tools)
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
        finally:
            running.cancel()  # a client that went away stops its generation

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _body(req) -> dict:
    return req.model_dump(exclude_unset=True, exclude_none=True)


def _add_routes(app: FastAPI, served: Scheduler, name: str, upstream: Upstream | None):
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model",
                                            "created": 0, "owned_by": "edgellm"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        lines = [f"edgellm_{k} {v}" for k, v in served.metrics.items()]
        lines.append(f"edgellm_queue_depth {served.pending}")
        lines.append(f"edgellm_prefix_cache_slot_swaps_total {served.prefix_cache.swaps}")
        return "\n".join(lines) + "\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if upstream and req.model != name:
            return await upstream.forward("/chat/completions", _body(req), "model")
        _check_model(name, req.model)
        sampling, stop = _sampling(req), _stops(req)
        ids, prefix, tools = _encode_chat(served.gen, req)
        if upstream and len(ids) >= served.gen.engine.kv_cache_len:
            return await upstream.forward("/chat/completions", _body(req), "context")
        served.check_context(ids)
        mask = await asyncio.get_running_loop().run_in_executor(None, served.tool_call_mask,
                                                                prefix, tools)
        served.admit()
        if req.stream:
            return await _stream_chat(served, name, req, ids, prefix, tools, sampling, stop,
                                      mask)
        result = await served.run(ids, sampling, req.max_completion_tokens or req.max_tokens,
                                  stop, mask=mask)
        message, finish = _chat_message(result, prefix, tools)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": _usage(result)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
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
        result = await served.run(ids, sampling, req.max_tokens, stop)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "text": result.text, "logprobs": None,
                             "finish_reason": FINISH[result.stop_reason]}],
                "usage": _usage(result)}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")


def _add_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.code, e.param), e.status,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "invalid JSON body" if first.get("type") == "json_invalid" else \
            f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        param = None if first.get("type") == "json_invalid" else where
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request",
                                       param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), e.status_code)


def _add_guards(app: FastAPI, api_key: str | None, max_body: int):
    @app.middleware("http")
    async def served_by(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault(SERVED_BY, "local")
        return response

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path not in ("/health", "/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return JSONResponse(error_body("missing or wrong API key",
                                               "authentication_error", "invalid_api_key"), 401)
        length = request.headers.get("content-length")
        if length and (not length.isdigit() or int(length) > max_body):
            return JSONResponse(error_body(f"request body over {max_body} bytes",
                                           "invalid_request_error", "body_too_large"), 413)
        if request.method == "POST" and not length:
            body = await request.body()  # chunked upload: measure what came
            if len(body) > max_body:
                return JSONResponse(error_body(f"request body over {max_body} bytes",
                                               "invalid_request_error", "body_too_large"), 413)
        return await call_next(request)


def create_app(gen: Generator, model_name: str, api_key: str | None = None,
               max_queue: int = 8, max_body: int = 1 << 20, cache_slots: int = 4,
               upstream: Upstream | None = None) -> FastAPI:
    """The ASGI app serving `gen` as `model_name` (other models / long prompts to `upstream`)."""
    app = FastAPI(title="edgellm", version="0.1.0")
    served = Scheduler(gen, max_queue, PrefixCache(gen, cache_slots))
    app.state.served = served
    _add_routes(app, served, model_name, upstream)
    _add_error_handlers(app)
    _add_guards(app, api_key, max_body)
    return app
