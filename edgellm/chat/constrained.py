"""Constrained decoding with llguidance (the grammar engine behind Guidance, vLLM's and llama.cpp's
structured output): per step, which vocabulary tokens can extend the answer within a grammar.

Three grammars: the rest of a forced call (`tool_choice` required or named: the answer starts
inside the call); the *lazy* grammar of `tool_choice` auto, free text until the model opens a call
in one of the forms chat.tools reads, then that call, valid for its tool's schema, then free text
again; and a JSON schema for `response_format`.

How the lazy grammar leaves JSON written for another reason alone: a fenced or bare object only
becomes a call once its first key is `"name"` and its value one of the offered tools' names (the
trigger is that whole head, a lazy lexeme of llguidance's); `{"name": "Alice", ...}` never
matches it and stays text. The template's tag, `<tool_call>`, is a call however it goes on.
"""

from __future__ import annotations

import json

import numpy as np

from edgellm.chat.tools import CLOSE_TAG, OPEN_TAG
from edgellm.errors import EdgeLLMError

# The layout Qwen-style templates train on: json.dumps' default separators.
_JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class TokenMask:
    """One generation's grammar state: masks logits, follows the sampled tokens."""

    def __init__(self, matcher):
        self.matcher = matcher
        self._bits = None  # the last bitmask, with the tokens it allows (and bans, if few)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        bits = self.matcher.compute_bitmask()
        if bits != self._bits:  # free text asks for the same mask step after step
            allowed = np.unpackbits(np.frombuffer(bits, dtype=np.uint8),
                                    bitorder="little")[:len(logits)].astype(bool)
            if not allowed.any():
                raise EdgeLLMError(f"constrained decoding reached a dead end: "
                                   f"{self.matcher.get_error() or 'no token allowed'}")
            banned = np.flatnonzero(~allowed) if allowed.mean() > 0.5 else None
            self._bits, self._allowed, self._banned = bits, allowed, banned
        if self._banned is None:  # most tokens banned (inside a call): one pass
            return np.where(self._allowed, logits, -np.inf)
        masked = np.array(logits, dtype=np.float32)  # free text: a few specials banned
        masked[self._banned] = -np.inf
        return masked

    def advance(self, token: int):
        if not self.matcher.consume_token(token):
            raise EdgeLLMError(f"constrained decoding rejected token {token}: "
                               f"{self.matcher.get_error()}")


class ToolCallGrammar:
    """Builds token masks for one model: forced calls, lazy calls, JSON schemas."""

    def __init__(self, tokenizer_json: str, n_vocab: int, eos_ids: list[int],
                 tag_is_token: bool = False):
        import llguidance

        self._llg = llguidance
        # Building the token trie takes about a second: done once per served model.
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab,
                                                eos_token=sorted(eos_ids))
        # Qwen's <tool_call> is one added token, which llguidance matches as a special token
        self._open, self._close = ((f"<{OPEN_TAG[1:-1]}>", f"<{CLOSE_TAG[1:-1]}>") if tag_is_token
                                   else (json.dumps(OPEN_TAG), json.dumps(CLOSE_TAG)))
        self.tag_is_token = tag_is_token

    @classmethod
    def for_generator(cls, gen) -> "ToolCallGrammar":
        """The grammar tokenizer of a runtime.generator.Generator's model."""
        return cls.for_text(gen.text, gen.artifact.manifest.config["vocab_size"])

    @classmethod
    def for_text(cls, text, n_vocab: int) -> "ToolCallGrammar":
        """The grammar tokenizer of a model's text interface (edgellm.text.ModelText), which
        can be made before its engine loads."""
        added = {t.content for t in text.tokenizer.get_added_tokens_decoder().values()}
        return cls(text.tokenizer.to_str(), n_vocab, text.eos_ids,
                   tag_is_token={OPEN_TAG, CLOSE_TAG} <= added)

    def _mask(self, lark: str, what: str) -> TokenMask:
        try:
            matcher = self._llg.LLMatcher(self.tokenizer,
                                          self._llg.LLMatcher.grammar_from_lark(lark),
                                          log_level=0)
        except Exception as e:  # llguidance raises ValueError/RuntimeError on a bad schema
            raise EdgeLLMError(f"cannot constrain {what}: {e}") from None
        if matcher.is_error():
            raise EdgeLLMError(f"cannot constrain {what}: {matcher.get_error()}")
        return TokenMask(matcher)

    def mask_after(self, prefix: str, tools: list[dict], parallel: bool = True) -> TokenMask:
        """A mask for what follows a forced `prefix` (chat.tools.forced_prefix): the arguments
        (or one of the names, then its arguments), the closing tag, and, `parallel`, more
        calls."""
        return self._mask(_forced(prefix, tools, parallel, self._open, self._close),
                          "this tool call")

    def lazy_calls(self, tools: list[dict], parallel: bool = True) -> TokenMask:
        """`tool_choice` auto: free text, and any call the model opens made valid."""
        return self._mask(self._lazy(tools, parallel), "these tools")

    def no_calls(self, tools: list[dict]) -> TokenMask:
        """`tool_choice` none with tools offered: an answer in words. It may not start with an
        object or a code fence, nor hold a call's head for one of the tools anywhere (after a
        tool result a small model otherwise writes the call again, as text)."""
        names = "|".join(_name(t) for t in tools)
        return self._mask("start: TEXT\n"
                          f'TEXT: /\\s*[^{{`\\s](.|\\n)*/ & '
                          f'~/(.|\\n)*\\{{\\s*"name"\\s*:\\s*"({names})"(.|\\n)*/\n',
                          "an answer without calls")

    def json_schema(self, schema: dict | None) -> TokenMask:
        """`response_format`: the whole answer one JSON value of `schema` (None: any object)."""
        schema = dict(schema or {"type": "object"})
        return self._mask(f"start: %json {_styled(schema)}\n", "this JSON schema")

    # --- grammars ------------------------------------------------------------------------

    def _lazy(self, tools: list[dict], parallel: bool) -> str:
        segs, rules = [], ["TEXT: /(.|\\n)+/"]
        if self.tag_is_token:
            rules.append(f"tag_call: TEXT? {self._open} WS? tag_any WS? {self._close}")
        else:
            rules += ["tag_hd[lazy]: /(.|\\n)*<tool_call>/",
                      f"tag_call: tag_hd WS? tag_any WS? {self._close}"]
        segs.append("tag_call")
        name_head = '\\{\\s*"name"\\s*:\\s*"%s"'
        rest = '/\\s*,\\s*"arguments"\\s*:\\s*/ %%json %s'
        for i, t in enumerate(tools):
            head = name_head % _name(t)
            rules += [f"bare_hd{i}[lazy]: /(.|\\n)*{head}/",
                      f"bare_call{i}: bare_hd{i} {rest % _schema(t)} /\\s*\\}}/",
                      f"fence_hd{i}[lazy]: /(.|\\n)*```(json)?\\s*{head}/",
                      f"fence_call{i}: fence_hd{i} {rest % _schema(t)} /\\s*\\}}\\s*```/"]
            segs += [f"bare_call{i}", f"fence_call{i}"]
        start = "start: seg* TEXT?" if parallel else "start: seg? TEXT?"
        return "\n".join([start, "seg: " + " | ".join(segs), *rules,
                          *_tag_calls(tools)]) + "\n"


def _tag_calls(tools: list[dict]) -> list[str]:
    """Calls in the template's tag: one of the tools' names, then its arguments."""
    rules = [f"tag_any: {' | '.join(f'tag_f{i}' for i in range(len(tools)))}"]
    for i, t in enumerate(tools):
        head = json.dumps(f'{{"name": "{_name(t)}", "arguments": ')
        rules.append(f'tag_f{i}: {head} %json {_schema(t)} "}}"')
    return rules + ["WS: /[ \\t\\n]+/"]


def _forced(prefix: str, tools: list[dict], parallel: bool, open_tag: str, close_tag: str) -> str:
    """The rest of a call whose start is forced (`prefix`), then, `parallel`, more calls."""
    if prefix.endswith('"arguments": '):  # the name is fixed: arguments, then close
        name = prefix.rsplit('"name": "', 1)[1].split('", "arguments"')[0]
        tool = next((t for t in tools if _name(t) == name), None)
        if tool is None:
            raise EdgeLLMError(f"tool_choice names {name!r}, which is not among the tools")
        first = f'first: %json {_schema(tool)} "}}"'
    else:
        rules = ["first: " + " | ".join(f"first{i}" for i in range(len(tools)))]
        for i, t in enumerate(tools):  # the prefix stops inside the name's string
            rest_of_name = json.dumps(f'{_name(t)}", "arguments": ')
            rules.append(f'first{i}: {rest_of_name} %json {_schema(t)} "}}"')
        first = "\n".join(rules)
    more = (f"(WS? {close_tag} (WS? {open_tag} WS? tag_any WS? {close_tag})*)?"
            if parallel else f"(WS? {close_tag})?")
    return "\n".join([f"start: first {more}", first, *_tag_calls(tools)]) + "\n"


def _name(tool: dict) -> str:
    return tool["function"]["name"]  # [A-Za-z0-9_-]: safe in literals and regexes alike


def _styled(schema: dict) -> str:
    return json.dumps({**schema, "x-guidance": _JSON_STYLE}, ensure_ascii=False)


def _schema(tool: dict) -> str:
    return _styled(dict(tool["function"].get("parameters") or {"type": "object"}))


def _lark_rest_of_call(prefix: str, tools: list[dict]) -> str:
    """The forced-call grammar with the tags as text (tests look at it)."""
    return _forced(prefix, tools, True, json.dumps(OPEN_TAG), json.dumps(CLOSE_TAG))
