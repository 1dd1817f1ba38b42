"""Thinking models: `<think>…</think>` kept out of `content` (reasoning_content), and
chat_template_kwargs / --thinking reaching the template (issue 20's Qwen3 part)."""

from __future__ import annotations

import json

import pytest

from edgellm.text.reasoning import ReasoningStream, split_reasoning

# Qwen3's generation prompt, shortened: enable_thinking=false writes an empty reasoning block;
# open_think (a kwarg of this test) opens the block in the prompt, as DeepSeek-R1's template does
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% if open_think %}<think>\n{% endif %}{% endif %}"
    "{% if pad %}{{ ' ' * pad }}{% endif %}")  # pad: arithmetic on a kwarg a client can get wrong


@pytest.mark.parametrize("text,inside,expected", [
    ("<think>\nhmm, France\n</think>\n\nParis.", False, ("hmm, France", "Paris.")),
    ("  <think>a</think>b", False, ("a", "b")),
    ("Paris. <think>not a block</think>", False, (None, "Paris. <think>not a block</think>")),
    ("cut off while thinking", True, ("cut off while thinking", "")),
    ("<think>cut off", False, ("cut off", "")),
    ("so</think>\n\nParis", True, ("so", "Paris")),
])
def test_split_reasoning(text, inside, expected):
    assert split_reasoning(text, inside) == expected


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7])
def test_streamed_pieces_split_as_the_whole(cut):
    text = "<think>\nthe capital</thin k> of </think>\n\nParis </think>"
    stream = ReasoningStream()
    events = []
    for i in range(0, len(text), cut):  # tags cut anywhere between pieces
        events += stream.feed(text[i:i + cut])
    events += stream.finish()
    reasoning = "".join(t for kind, t in events if kind == "reasoning")
    content = "".join(t for kind, t in events if kind == "content")
    assert (reasoning.strip(), content) == split_reasoning(text)
    assert content == "Paris </think>"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from edgellm.compiler import BuildOptions, build
    from edgellm.runtime.generator import Generator
    from edgellm.server.app import create_app
    from helpers import make_tiny_model

    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("think")
    make_tiny_model(tmp / "hf", "qwen3", False, seed=1, head_dim=32)
    cfg_path = tmp / "hf" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": THINKING_TEMPLATE}))
    art = build(tmp / "hf", tmp / "art", BuildOptions(kv_cache_len=256))
    with TestClient(create_app(Generator.load(art, threads=1), "tiny")) as client:
        yield client


def _chat(client, **extra):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 12, "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body)


def test_chat_template_kwargs_reach_the_template(client):
    plain = _chat(client).json()["usage"]["prompt_tokens"]
    off = _chat(client, chat_template_kwargs={"enable_thinking": False}).json()
    assert off["usage"]["prompt_tokens"] > plain  # the empty <think></think> block
    refused = _chat(client, chat_template_kwargs={"messages": []})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "chat_template_kwargs"
    wrong = _chat(client, chat_template_kwargs=["enable_thinking"])
    assert wrong.status_code == 400
    # a value the template cannot compute with: the request's fault (it was a 500)
    typed = _chat(client, chat_template_kwargs={"pad": "x"})
    assert typed.status_code == 400 and "TypeError" in typed.json()["error"]["message"]


def test_an_answer_inside_the_reasoning_is_reasoning_content(client):
    """The template opened <think>: everything the (random) model writes before a </think> is
    reasoning, in the whole answer and in the stream alike."""
    whole = _chat(client, chat_template_kwargs={"open_think": True}).json()
    message = whole["choices"][0]["message"]
    assert message["content"] == "" and message["reasoning_content"], json.dumps(whole)
    raw = _chat(client, chat_template_kwargs={"open_think": True}, stream=True).text
    chunks = [json.loads(line[6:]) for line in raw.splitlines()
              if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas).strip() == \
        message["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == ""
    assert raw.rstrip().endswith("data: [DONE]")


def test_ollamas_think_reaches_the_template(client):
    """/api/chat's think: false writes Qwen3's empty reasoning block (enable_thinking false),
    true leaves the model to think (accepted: the template thinks)."""
    def chat(**extra):
        body = {"model": "tiny", "stream": False, "options": {"temperature": 0,
                                                              "num_predict": 4},
                "messages": [{"role": "user", "content": "hello"}], **extra}
        reply = client.post("/api/chat", json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()

    plain, on, off = chat(), chat(think=True), chat(think=False)
    assert on["prompt_eval_count"] == plain["prompt_eval_count"] < off["prompt_eval_count"]
    assert on["message"]["role"] == "assistant" and on["done"]
