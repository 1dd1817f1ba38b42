"""A thinking model's reasoning, kept out of its answer: Qwen3 (and DeepSeek-R1-style templates)
write `<think>…</think>` before the answer; the OpenAI-style API returns it as
`reasoning_content` (as vLLM and llama-server do) and `content` holds only what follows.

A template that opens the tag itself (its generation prompt ends in `<think>`) starts the answer
inside the reasoning. Models whose template never mentions `<think>` are left alone.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def thinks(template_source: str | None) -> bool:
    return bool(template_source) and OPEN in template_source


def opens_inside(prompt_text: str) -> bool:
    """The rendered prompt already opened the reasoning."""
    return prompt_text.rstrip().endswith(OPEN)


def split_reasoning(text: str, inside: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole answer; an answer cut off while thinking is all
    reasoning."""
    stream = ReasoningStream(inside)
    events = stream.feed(text) + stream.finish()
    reasoning = "".join(t for kind, t in events if kind == "reasoning")
    content = "".join(t for kind, t in events if kind == "content")
    return (reasoning.strip() if stream.reasoned else None), content


class ReasoningStream:
    """Text pieces in, ("reasoning" | "content", text) events out; a piece that may be the start
    of a tag is held back until the next one tells."""

    def __init__(self, inside: bool = False):
        self.state = "inside" if inside else "start"
        self.reasoned = inside
        self.held = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.held += piece
        out: list[tuple[str, str]] = []
        while self.held:
            if self.state == "start":
                text = self.held.lstrip()
                if text.startswith(OPEN):
                    self.held, self.state, self.reasoned = text[len(OPEN):], "inside", True
                elif OPEN.startswith(text):  # whitespace or part of the tag so far
                    break
                else:
                    self.state = "content"
            elif self.state == "inside":
                end = self.held.find(CLOSE)
                if end >= 0:
                    out.append(("reasoning", self.held[:end]))
                    self.held, self.state = self.held[end + len(CLOSE):], "after"
                    continue
                keep = _partial_suffix(self.held, CLOSE)
                out.append(("reasoning", self.held[:len(self.held) - keep]))
                self.held = self.held[len(self.held) - keep:]
                break
            elif self.state == "after":  # the blank lines between the reasoning and the answer
                self.held = self.held.lstrip()
                if self.held:
                    self.state = "content"
            else:
                out.append(("content", self.held))
                self.held = ""
        return [(kind, text) for kind, text in out if text]

    def finish(self) -> list[tuple[str, str]]:
        kind = "reasoning" if self.state == "inside" else "content"
        held, self.held = self.held, ""
        return [(kind, held)] if held and self.state != "after" else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
