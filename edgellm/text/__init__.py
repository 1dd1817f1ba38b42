"""The model's text interface, shared by the runtime and the chat layer: tokenizer, chat
template (edgellm.text.template) and incremental detokenization (edgellm.text.stream)."""

from edgellm.text.model_text import ModelText
from edgellm.text.stream import TextStream

__all__ = ["ModelText", "TextStream"]
