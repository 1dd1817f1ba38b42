"""The steps of a chat request that every API surface shares (the OpenAI routes in server.app,
the Ollama routes in server.ollama): the prompt rendered with the model's template and tools,
the grammar that holds the answer, the answer parsed back into a message, a non-streamed
generation watched for the client leaving."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from fastapi import Request

from edgellm.chat.constrained import TokenMask
from edgellm.chat.tools import forced_prefix, messages_for_template, parse_tool_calls
from edgellm.errors import EdgeLLMError
from edgellm.runtime.generator import GenerationResult, Generator
from edgellm.runtime.sampler import SamplingConfig
from edgellm.server.errors import APIError
from edgellm.server.scheduler import Scheduler
from edgellm.server.schemas import ChatRequest, Message
from edgellm.text.reasoning import ReasoningStream, opens_inside, split_reasoning, thinks

FINISH = {"eos": "stop", "stop": "stop", "cancelled": "stop", "length": "length",
          "kv_cache_full": "length"}


# what the server itself gives the template; chat_template_kwargs may not replace them
TEMPLATE_ARGS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


def encode_chat(gen: Generator, req: ChatRequest, tool_system: str | None = None
                ) -> tuple[list[int], str, list[dict], bool | None]:
    """Prompt ids, the forced start of the answer (tool_choice), the active tools, and where
    a thinking model's answer starts (None: the template has no reasoning; True: inside it).
    `tool_system` (serve --tool-system-prompt): the system message of a request that offers
    tools and brings none of its own."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice or ("auto" if tools else "none")
    if not isinstance(choice, str):  # {"type": "function", "function": {"name": ...}}
        choice = choice.model_dump()
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names an unknown function {name!r}",
                           param="tool_choice")
    active = tools if choice != "none" else []
    if active and req.response_format and req.response_format.type != "text":
        raise APIError(400, "response_format with tools is not supported; use one or the "
                            "other", param="response_format")
    if gen.template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions")
    # a template that cannot render tools gets them as Hermes-style instructions instead
    renders_tools = "tools" in gen.template.source
    given = [m.model_dump(exclude_none=True) for m in req.messages]
    if tool_system and active and not any(m["role"] in ("system", "developer") for m in given):
        given.insert(0, {"role": "system", "content": tool_system})
    messages = messages_for_template(given, active, renders_tools)
    extra = req.chat_template_kwargs or {}
    if TEMPLATE_ARGS & set(extra):
        raise APIError(400, f"chat_template_kwargs may not set "
                            f"{', '.join(sorted(TEMPLATE_ARGS & set(extra)))}",
                       param="chat_template_kwargs")
    try:
        text = gen.template.render(messages, add_generation_prompt=True,
                                   tools=(active or None) if renders_tools else None, **extra)
    except EdgeLLMError as e:
        raise APIError(400, str(e)) from None
    prefix = forced_prefix(choice, active) if active else ""
    ids = gen.tokenizer.encode(text + prefix, add_special_tokens=False).ids
    inside = (opens_inside(text) and not prefix) if thinks(gen.template.source) else None
    return ids, prefix, active, inside


def grammar_mask(served: Scheduler, req: ChatRequest, prefix: str, tools: list[dict],
             lazy: bool) -> TokenMask | None:
    """The token mask of one request: a forced call's rest, the lazy grammar of `auto`
    calls, response_format's schema, or with `tool_choice` none and tools offered an answer
    that writes no call as text; None when the answer is free."""
    parallel = req.parallel_tool_calls
    fmt = req.response_format
    if fmt and fmt.type != "text":
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        return served.mask(lambda g: g.json_schema(schema), "response_format")
    if tools and prefix:
        return served.mask(lambda g: g.mask_after(prefix, tools, parallel), "tools")
    if tools and lazy:
        return served.mask(lambda g: g.lazy_calls(tools, parallel), "tools")
    if not tools and req.tools and lazy:  # tool_choice none
        offered = [t.model_dump(exclude_none=True) for t in req.tools]
        return served.mask(lambda g: g.no_calls(offered), "tools")
    return None


def chat_message(r: GenerationResult, prefix: str, tools: list[dict],
                  parallel: bool = True, thinking: bool | None = None) -> tuple[dict, str]:
    reasoning, text = split_reasoning(r.text, thinking) if thinking is not None else (None,
                                                                                      r.text)
    said = {"reasoning_content": reasoning} if reasoning is not None else {}
    if not tools:
        return {"role": "assistant", "content": text, **said}, FINISH[r.stop_reason]
    parsed = parse_tool_calls(prefix + text, tools, parallel)
    if parsed.calls:
        return ({"role": "assistant", "content": parsed.content or None, **said,
                 "tool_calls": parsed.calls}, "tool_calls")
    message = {"role": "assistant", "content": prefix + text, **said}
    if parsed.error:
        message["tool_call_error"] = parsed.error  # reported, not passed on as a call
    return message, FINISH[r.stop_reason]


# serve --check-calls: asked as a further user turn of the request's own conversation, so the
# prefix cache holds all of it but the question (docs/AGENTS.md measured this and a fresh one)
CHECK_QUESTION = ("Is calling the function `{name}` the right way to answer my request? "
                  "Answer yes or no.")


class YesOrNo:
    """The mask of a one-token answer to a yes/no question: the model's "yes" where its
    p(yes) / (p(yes) + p(no)) over the tokens that start either word is at least
    `threshold`, else its "no"; `p_yes` keeps the figure."""

    def __init__(self, gen: Generator, threshold: float):
        def first(words):
            return sorted({gen.tokenizer.encode(w, add_special_tokens=False).ids[0]
                           for w in words})

        self.yes, self.no = first(["yes", "Yes", " yes", " Yes"]), first(["no", "No", " no",
                                                                          " No"])
        self.threshold, self.p_yes = threshold, None

    def apply(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64)
        top = max(logits[self.yes].max(), logits[self.no].max())
        yes, no = np.exp(logits[self.yes] - top).sum(), np.exp(logits[self.no] - top).sum()
        self.p_yes = float(yes / (yes + no))
        out = np.full(len(logits), -np.inf, np.float32)
        out[self.yes[0] if self.p_yes >= self.threshold else self.no[0]] = 0.0
        return out

    def advance(self, token: int):
        pass


def checks_calls(served: Scheduler, prefix: str, tools: list[dict]) -> bool:
    """Whether serve --check-calls asks about this request's calls: tool_choice auto only (a
    required or named call, `prefix`, was asked for)."""
    return served.check_calls is not None and bool(tools) and not prefix


async def checked_calls(served: Scheduler, req: ChatRequest, ids: list[int], prefix: str,
                        tools: list[dict], result: GenerationResult, sampling, max_tokens,
                        stop, cancel: threading.Event | None = None) -> GenerationResult:
    """serve --check-calls P: the answer as it is, or, where it calls a function the model,
    asked whether that is the right way to answer, does not hold to fit (p(yes) below P), the
    answer again in words (the grammar of tool_choice none); see checks_calls."""
    if not checks_calls(served, prefix, tools) or result.stop_reason == "cancelled":
        return result
    calls = parse_tool_calls(result.text, tools, req.parallel_tool_calls).calls
    for name in dict.fromkeys(c["function"]["name"] for c in calls):
        question = req.model_copy(update={"messages": [
            *req.messages, Message(role="user", content=CHECK_QUESTION.format(name=name))]})
        asked = encode_chat(served.gen, question, served.tool_system)[0]
        if len(asked) >= served.gen.engine.kv_cache_len:
            continue  # no room to ask: the call stands
        verdict = YesOrNo(served.gen, served.check_calls)
        await served.follow_up(asked, SamplingConfig(), 1, (), cancel, verdict)
        if verdict.p_yes is not None and verdict.p_yes < served.check_calls:
            words = await asyncio.get_running_loop().run_in_executor(
                None, served.mask, lambda g: g.no_calls(tools), "tools")
            return await served.follow_up(ids, sampling, max_tokens, stop, cancel, words)
    return result


def split_pieces(thinking: ReasoningStream | None, piece: str | None) -> list[tuple[str, str]]:
    """A streamed piece as ("reasoning" | "content", text) parts; None: the end of the answer."""
    if thinking is None:
        return [("content", piece)] if piece else []
    return thinking.feed(piece) if piece is not None else thinking.finish()


async def watched(request: Request, run, cancel: threading.Event):
    """Await `run` (a non-streamed generation), cancelling it once the client has gone."""
    task = asyncio.ensure_future(run)
    while not task.done():
        await asyncio.wait({task}, timeout=0.05)  # a client gone is noticed within 50 ms
        if not task.done() and await request.is_disconnected():
            cancel.set()
    return task.result()
