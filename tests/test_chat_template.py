"""The stored chat template renders exactly as transformers.apply_chat_template does."""

from __future__ import annotations

import pytest

from edgellm.artifact.reader import load_artifact
from edgellm.text.template import ChatTemplate
from edgellm.errors import EdgeLLMError

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour !"},
     {"role": "user", "content": "Ça va ? 🦙 東京"}],
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def _ours(artifact_path) -> ChatTemplate:
    tok = load_artifact(artifact_path).manifest.tokenizer
    return ChatTemplate(tok["chat_template"], tok["bos_token"], tok["eos_token"])


@pytest.mark.slow
@pytest.mark.parametrize("gguf,artifact", [("qwen_gguf", "qwen_s8"), ("smol_gguf", "smol_s8")])
def test_renders_like_transformers(gguf, artifact, request):
    transformers = pytest.importorskip("transformers")
    path = request.getfixturevalue(gguf)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = _ours(request.getfixturevalue(artifact))
    for messages in CONVERSATIONS:
        for add in (True, False):
            expected = theirs.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add)
            assert ours.render(messages, add_generation_prompt=add) == expected
    if gguf == "qwen_gguf":  # Qwen's template renders tools
        expected = theirs.apply_chat_template(CONVERSATIONS[0], tools=TOOLS, tokenize=False,
                                              add_generation_prompt=True)
        assert ours.render(CONVERSATIONS[0], tools=TOOLS) == expected
        assert '"get_weather"' in expected


def test_template_is_sandboxed():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(EdgeLLMError):
        ChatTemplate(evil, None, None).render([{"role": "user", "content": "x"}])


def test_raise_exception_becomes_a_clear_error():
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}", None, None)
    with pytest.raises(EdgeLLMError, match="roles must alternate"):
        t.render([{"role": "user", "content": "x"}])
