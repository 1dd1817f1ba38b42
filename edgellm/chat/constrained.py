"""Constrained decoding: a token mask that keeps a forced tool call valid JSON for its schema.

The grammar engine is llguidance (the Rust library behind Guidance and vLLM's structured output):
it computes, per step, which vocabulary tokens can extend the text without leaving the grammar.
"""

from __future__ import annotations

import json

import numpy as np

from edgellm.errors import EdgeLLMError

# The layout Qwen-style templates train on: json.dumps' default separators.
_JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class TokenMask:
    """One generation's grammar state: masks logits, follows the sampled tokens."""

    def __init__(self, matcher):
        self.matcher = matcher

    def apply(self, logits: np.ndarray) -> np.ndarray:
        allowed = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8),
                                bitorder="little")[:len(logits)].astype(bool)
        if not allowed.any():
            raise EdgeLLMError(f"constrained decoding reached a dead end: "
                               f"{self.matcher.get_error() or 'no token allowed'}")
        return np.where(allowed, logits, -np.inf)

    def advance(self, token: int):
        if not self.matcher.consume_token(token):
            raise EdgeLLMError(f"constrained decoding rejected token {token}: "
                               f"{self.matcher.get_error()}")


class ToolCallGrammar:
    """Builds token masks for the rest of a forced tool call (see chat.tools.forced_prefix)."""

    def __init__(self, tokenizer_json: str, n_vocab: int, eos_ids: list[int]):
        import llguidance

        self._llg = llguidance
        # Building the token trie takes about a second: done once per served model.
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab,
                                                eos_token=sorted(eos_ids))

    @classmethod
    def for_generator(cls, gen) -> "ToolCallGrammar":
        """The grammar tokenizer of a runtime.generator.Generator's model."""
        return cls(gen.tokenizer.to_str(), gen.artifact.manifest.config["vocab_size"],
                   gen.eos_ids)

    def mask_after(self, prefix: str, tools: list[dict]) -> TokenMask:
        """A mask for what follows `prefix`: the arguments object (and the closing brace), or,
        when the prefix stops inside the name, one of the tools' names and then its arguments."""
        lark = _lark_rest_of_call(prefix, tools)
        try:
            matcher = self._llg.LLMatcher(self.tokenizer,
                                          self._llg.LLMatcher.grammar_from_lark(lark),
                                          log_level=0)
        except Exception as e:  # llguidance raises ValueError/RuntimeError on a bad schema
            raise EdgeLLMError(f"cannot constrain this tool call: {e}") from None
        if matcher.is_error():
            raise EdgeLLMError(f"cannot constrain this tool call: {matcher.get_error()}")
        return TokenMask(matcher)


def _schema(tool: dict) -> str:
    schema = dict(tool["function"].get("parameters") or {"type": "object"})
    schema["x-guidance"] = _JSON_STYLE
    return json.dumps(schema, ensure_ascii=False)


def _lark_rest_of_call(prefix: str, tools: list[dict]) -> str:
    if prefix.endswith('"arguments": '):  # the name is fixed: arguments, then close the call
        name = json.loads('"' + prefix.rsplit('"name": "', 1)[1].split('", "arguments"')[0] + '"')
        tool = next((t for t in tools if t["function"]["name"] == name), None)
        if tool is None:
            raise EdgeLLMError(f"tool_choice names {name!r}, which is not among the tools")
        return f"start: %json {_schema(tool)} \"}}\"\n"
    after_name = '", "arguments": '
    rules = [f"call{i}: {json.dumps(t['function']['name'] + after_name)} "
             f"%json {_schema(t)} \"}}\"" for i, t in enumerate(tools)]
    return "start: " + " | ".join(f"call{i}" for i in range(len(tools))) + "\n" + \
        "\n".join(rules) + "\n"
