"""The Ollama API beside the OpenAI one (issue 31): /api/chat, /api/generate, /api/tags,
/api/show, /api/ps, /api/version, /api/pull, /api/embed, as the official `ollama` client and the
home hubs' Ollama integrations call them.

Each request is translated to the OpenAI route's request (server.schemas.ChatRequest) and runs
as the same scheduler task: the same template rendering, slots, lazy tool grammar, JSON schema
grammar, prefix caches and limits. Differences kept from Ollama: newline-delimited JSON streams
by default; tool-call arguments as JSON objects; Ollama's sampling defaults where a request gives
no option (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1 over the last 64 tokens);
errors as {"error": "..."}. `options.num_ctx` does not resize the context (it is fixed when the
server starts: `serve --ctx-size`); a prompt longer than the served context is a 400 that says
which --ctx-size holds it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgellm import __version__
from edgellm.errors import EdgeLLMError
from edgellm.runtime.sampler import SamplingConfig
from edgellm.server import steps
from edgellm.server.errors import APIError
from edgellm.server.schemas import ChatRequest, Tool, surrogate_at
from edgellm.text.reasoning import ReasoningStream, thinks

log = logging.getLogger("edgellm.server")
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1,
            "repeat_last_n": 64}
DONE = {"eos": "stop", "stop": "stop", "cancelled": "stop", "length": "length",
        "kv_cache_full": "length"}


class Options(BaseModel):
    """The options edgellm acts on; Ollama's others (num_thread, mirostat, ...) are accepted and
    ignored, as Ollama ignores those a runner does not know."""
    model_config = ConfigDict(extra="ignore")
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = None
    num_predict: int | None = None  # -1 / -2 (Ollama's "until the context is full"): no limit
    stop: list[str] | str | None = None
    repeat_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    num_ctx: int | None = Field(default=None, ge=1)


class ToolFunctionCall(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(BaseModel):
    function: ToolFunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class Request_(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    keep_alive: str | int | float | None = None  # accepted: the model stays loaded
    think: bool | Literal["low", "medium", "high"] | None = None


class ChatBody(Request_):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None


class GenerateBody(Request_):
    prompt: str = ""
    system: str | None = None
    template: str | None = None
    raw: bool = False
    suffix: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None


class NameBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # the older field
    stream: bool = True

    def which(self) -> str:
        if not (self.model or self.name):
            raise APIError(400, "model is required")
        return self.model or self.name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _check_model(served: str, asked: str) -> str:
    """The name to answer with (as asked); 404 in Ollama's words for another model."""
    if asked not in (served, _tagged(served)):
        raise APIError(404, f"model '{asked}' not found; this server serves "
                            f"'{_tagged(served)}'")
    return asked


def _invalid(e: ValidationError) -> APIError:
    """A validation error as a 400 naming the first field at fault."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return APIError(400, f"{where}: {first.get('msg', 'invalid')}")


def _parse(model, body: dict):
    try:
        return model(**body)
    except ValidationError as e:
        raise _invalid(e) from None
    except TypeError:
        raise APIError(400, "the body must be a JSON object") from None


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise APIError(400, "invalid JSON body") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    if where := surrogate_at(body):
        raise APIError(400, f"{where} holds a lone UTF-16 surrogate, which is not text")
    return body


def _sampling(options: Options | None) -> tuple[SamplingConfig, int | None, tuple[str, ...]]:
    o = {**DEFAULTS, **(options.model_dump(exclude_none=True) if options else {})}
    window = o["repeat_last_n"]
    penalty = o["repeat_penalty"] if window != 0 else 1.0
    try:
        sampling = SamplingConfig(temperature=o["temperature"], top_k=o["top_k"],
                                  top_p=o["top_p"], repetition_penalty=penalty,
                                  penalty_window=max(window, 1) if window != -1 else 1 << 30,
                                  seed=None if o.get("seed") is None else o["seed"] % 2**64)
    except EdgeLLMError as e:
        raise APIError(400, str(e)) from None
    predict = o.get("num_predict")
    stop = o.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    return sampling, predict if predict and predict > 0 else None, tuple(s for s in stop if s)


def _openai_messages(messages: list[Message]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if m.images:
            raise APIError(400, f"messages.{i}.images: this model reads text only")
        message = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": f"call_{i}_{j}", "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": json.dumps(c.function.arguments)}}
                for j, c in enumerate(m.tool_calls)]
        if m.role == "tool" and m.tool_name:
            message["name"] = m.tool_name
        out.append(message)
    return out


def _chat_request(gen, name: str, body: Request_, messages: list[dict], tools) -> ChatRequest:
    fmt = body.format
    response_format = None
    if fmt == "json":
        response_format = {"type": "json_object"}
    elif isinstance(fmt, dict):
        response_format = {"type": "json_schema", "json_schema": {"name": "format",
                                                                  "schema": fmt}}
    kwargs = None
    if body.think is not None:
        if gen.template is None or not thinks(gen.template.source):
            if body.think:
                raise APIError(400, f"'{name}' does not support thinking")
        else:
            kwargs = {"enable_thinking": bool(body.think)}
    try:
        return ChatRequest(model=name, messages=messages, tools=tools or None,
                           response_format=response_format, chat_template_kwargs=kwargs)
    except ValidationError as e:
        raise _invalid(e) from None


def _ollama_message(message: dict) -> dict:
    """An OpenAI assistant message (steps.chat_message's) in Ollama's shape."""
    out = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("reasoning_content"):
        out["thinking"] = message["reasoning_content"]
    if message.get("tool_calls"):
        out["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                           "arguments": json.loads(c["function"]["arguments"])}}
                             for c in message["tool_calls"]]
    return out


def _timings(result, started: float) -> dict:
    prefill = result.ttft_ms / 1000
    decode = (len(result.token_ids) - 1) / result.decode_tok_s if result.decode_tok_s else 0.0
    return {"total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens,
            "prompt_eval_duration": int(prefill * 1e9), "eval_count": len(result.token_ids),
            "eval_duration": int(decode * 1e9)}


def _line(body: dict) -> str:
    return json.dumps(body, ensure_ascii=False) + "\n"


def add_routes(app: FastAPI, served, name: str, tool_grammar: bool, artifact) -> None:
    gen = served.gen
    m = artifact.manifest
    digest = hashlib.sha256((artifact.path / "manifest.json").read_bytes()).hexdigest()
    modified = datetime.fromtimestamp((artifact.path / "manifest.json").stat().st_mtime,
                                      timezone.utc).isoformat().replace("+00:00", "Z")
    size = sum(f.get("size", 0) for f in m.files.values())

    from edgellm.artifact.inspect import layout_label
    from edgellm.bench import parameter_count

    cfg = gen.artifact.config
    params = parameter_count(cfg)
    details = {"parent_model": "", "format": "edgellm", "family": cfg.arch,
               "families": [cfg.arch],
               "parameter_size": f"{params / 1e9:.1f}B" if params >= 1e9 else
               f"{params / 1e6:.0f}M",
               "quantization_level": layout_label(m.weight_scheme, m.post_scheme,
                                                  bool(m.layer_schemes))}
    listed = {"name": _tagged(name), "model": _tagged(name), "modified_at": modified,
              "size": size, "digest": digest, "details": details}

    async def generation(request: Request, body: Request_, messages: list[dict], tools,
                         key: str):
        """Run a chat translated to the OpenAI route's steps; Ollama's answer or stream."""
        started = time.perf_counter()
        asked = _check_model(name, body.model)
        sampling, predict, stop = _sampling(body.options)
        req = _chat_request(gen, name, body, messages, tools)
        ids, prefix, active, inside = steps.encode_chat(gen, req, served.tool_system)
        served.check_context(ids)
        mask = await asyncio.get_running_loop().run_in_executor(
            None, steps.grammar_mask, served, req, prefix, active, tool_grammar)
        served.admit()
        head = {"model": asked}

        def answer(result) -> dict:
            message, _ = steps.chat_message(result, prefix, active, True, inside)
            message = _ollama_message(message)
            if key == "response":
                said = {"response": message["content"]}
                if "thinking" in message:
                    said["thinking"] = message["thinking"]
                return said
            return {"message": message}

        def final(result) -> dict:
            return {**head, "created_at": _now(), **({"message": {"role": "assistant",
                                                                  "content": ""}}
                                                     if key == "message" else {"response": ""}),
                    "done": True, "done_reason": DONE[result.stop_reason],
                    **_timings(result, started)}

        async def checked(result):  # serve --check-calls
            return await steps.checked_calls(served, req, ids, prefix, active, result, sampling,
                                             predict, stop, cancel)

        cancel = threading.Event()
        if not body.stream:
            async def run():
                return await checked(await served.run(ids, sampling, predict, stop,
                                                       cancel=cancel, mask=mask))

            result = await steps.watched(request, run(), cancel)
            return {**final(result), **answer(result)}
        live = not active  # tool calls are parsed whole, then sent as one message
        running = served.stream(ids, sampling, predict, stop, mask, pieces=live)
        thinking = ReasoningStream(inside) if inside is not None and live else None

        def pieces(piece: str | None) -> list[dict]:
            out = []
            for kind, text in steps.split_pieces(thinking, piece):
                if key == "message":
                    part = {"role": "assistant", "content": "" if kind == "reasoning" else text}
                    if kind == "reasoning":
                        part["thinking"] = text
                    out.append({"message": part})
                else:
                    out.append({"thinking": text} if kind == "reasoning" else {"response": text})
            return out

        async def lines():
            try:
                async for piece in running:
                    for part in pieces(piece):
                        yield _line({**head, "created_at": _now(), **part, "done": False})
                for part in pieces(None) if live else ():
                    yield _line({**head, "created_at": _now(), **part, "done": False})
                result = await checked(running.result())
                if not live:
                    yield _line({**head, "created_at": _now(), **answer(result), "done": False})
                yield _line(final(result))
            except APIError as e:
                yield _line({"error": e.message})
            except Exception as e:  # a bug: the client still gets an error line, not a cut
                log.exception("stream failed")
                yield _line({"error": f"internal error ({type(e).__name__}); the server's "
                                      f"log has the details"})
            finally:
                running.cancel()  # a client that went away stops its generation
                cancel.set()  # and a --check-calls follow-up

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/api/chat")
    async def chat(request: Request):
        body = _parse(ChatBody, await _json(request))
        if not body.messages:  # Ollama: an empty chat loads the model
            _check_model(name, body.model)
            return {"model": body.model, "created_at": _now(),
                    "message": {"role": "assistant", "content": ""}, "done": True,
                    "done_reason": "load"}
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        return await generation(request, body, _openai_messages(body.messages), tools,
                                "message")

    @app.post("/api/generate")
    async def generate(request: Request):
        body = _parse(GenerateBody, await _json(request))
        for field in ("template", "suffix", "context", "images"):
            if getattr(body, field):
                raise APIError(400, f"{field} is not supported by this server (edgellm renders "
                                    f"the model's own chat template)")
        if body.raw:
            raise APIError(400, "raw is not supported by /api/generate here; /v1/completions "
                                "takes a raw prompt")
        if not body.prompt:
            _check_model(name, body.model)
            return {"model": body.model, "created_at": _now(), "response": "", "done": True,
                    "done_reason": "load"}
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
            [{"role": "user", "content": body.prompt}]
        return await generation(request, body, messages, [], "response")

    @app.get("/api/version")
    async def version():
        return {"version": __version__}

    @app.get("/api/tags")
    async def tags():
        return {"models": [listed]}

    @app.get("/api/ps")
    async def ps():
        return {"models": [{**listed, "expires_at": "2999-01-01T00:00:00Z",
                            "size_vram": 0, "context_length": gen.engine.kv_cache_len}]}

    @app.post("/api/show")
    async def show(request: Request):
        asked = _check_model(name, _parse(NameBody, await _json(request)).which())
        arch = cfg.arch
        source = gen.template.source if gen.template else ""
        capabilities = ["completion"] + (["tools"] if "tools" in source else []) + \
            (["thinking"] if source and thinks(source) else [])
        return {"license": "", "modelfile": f"# edgellm artifact {gen.artifact.path.name}\n"
                                            f"FROM {asked}\n",
                "parameters": "", "template": source, "details": details,
                "model_info": {"general.architecture": arch,
                               "general.parameter_count": params,
                               f"{arch}.context_length": gen.engine.kv_cache_len,
                               f"{arch}.embedding_length": cfg.hidden_size,
                               f"{arch}.block_count": cfg.num_layers,
                               f"{arch}.attention.head_count": cfg.num_heads,
                               f"{arch}.attention.head_count_kv": cfg.num_kv_heads},
                "capabilities": capabilities, "modified_at": modified}

    @app.post("/api/pull")
    async def pull(request: Request):
        body = _parse(NameBody, await _json(request))
        _check_model(name, body.which())
        steps = ["pulling manifest", "verifying sha256 digest", "writing manifest", "success"]
        if not body.stream:
            return {"status": "success"}
        return StreamingResponse((_line({"status": s}) for s in steps),
                                 media_type="application/x-ndjson")

    @app.post("/api/embed")
    @app.post("/api/embeddings")
    async def embed(request: Request):
        raise APIError(501, f"embeddings are not available: '{_tagged(name)}' is a generative "
                            f"model served without an embedding output")
