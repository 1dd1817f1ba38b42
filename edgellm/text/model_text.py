"""A model's text interface, read from its artifact: tokenizer, chat template, end-of-turn ids."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from edgellm.artifact.reader import Artifact
from edgellm.errors import EdgeLLMError
from edgellm.text.template import ChatTemplate


@dataclass
class ModelText:
    tokenizer: Tokenizer
    template: ChatTemplate | None  # None: a base model without a chat template
    eos_ids: set[int]

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> "ModelText":
        tok = artifact.manifest.tokenizer
        template = ChatTemplate(tok["chat_template"], tok["bos_token"], tok["eos_token"]) \
            if tok.get("chat_template") else None
        try:
            tokenizer = Tokenizer.from_file(str(artifact.path / tok["file"]))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise EdgeLLMError(f"the tokenizer {artifact.path / tok['file']} does not load "
                               f"({e}); the artifact looks damaged: rebuild it") from None
        return cls(tokenizer, template, set(tok["eos_ids"]))

    def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        """Prompt ids of a conversation, ready for the model's answer."""
        if self.template is None:  # a base model: plain text, with the tokenizer's own specials
            text = "\n".join(m["content"] for m in messages)
            return self.tokenizer.encode(text).ids
        text = self.template.render(messages, add_generation_prompt=True, **template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False).ids
