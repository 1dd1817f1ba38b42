"""`edgellm chat`: commands, KV reuse across turns, overflow handling, Ctrl-C."""

from __future__ import annotations

import io
import signal
import sys
import time

import pytest

from edgellm.chat.repl import ChatLoop
from edgellm.runtime.generator import Generator
from edgellm.runtime.sampler import SamplingConfig
from helpers import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgellm.compiler import BuildOptions, build

    src = tmp_path_factory.mktemp("src") / "hf"
    make_tiny_model(src, "qwen2", tied=False, scale=3.0, embed_boost=20.0)
    return build(src, tmp_path_factory.mktemp("art") / "a",
                 BuildOptions(kv_cache_len=96, prefill_len=16))


def _run(artifact, lines, max_new_tokens=4, system=None):
    out = io.StringIO()
    loop = ChatLoop(Generator.load(artifact), SamplingConfig(), max_new_tokens, system, out)
    feed = iter(lines)
    loop.run(read=lambda prompt: next(feed))
    return loop, out.getvalue()


def test_second_turn_reuses_the_cache_and_commands_work(tiny):
    loop, out = _run(tiny, ["hello world", "the capital", "/stats", "/system be brief",
                            "paris", "/reset", "/exit"])
    assert "(0 reused)" in out
    second = out.split("[ttft")[2]
    reused = int(second.split("(")[1].split(" reused")[0])
    assert reused > 10
    assert "[system prompt set, conversation cleared]" in out and "[conversation cleared]" in out
    assert loop.messages == []


def test_overflow_drops_the_oldest_turns_and_keeps_the_system_prompt(tiny):
    lines = [f"hello world number {i} " * 3 for i in range(6)] + ["/exit"]
    loop, out = _run(tiny, lines, system="sys")
    assert "dropped the" in out and "kept the system prompt" in out
    assert "[error" not in out
    ids = loop.gen.encode_chat(loop._head() + loop.messages)
    assert len(ids) <= 96


def test_a_single_message_over_the_cache_is_an_error_not_a_crash(tiny):
    _, out = _run(tiny, ["word " * 200, "/exit"])
    assert "[error:" in out and "KV cache" in out


def test_ctrl_c_stops_the_answer_but_not_the_chat(tmp_path):
    """A cache of 4096 positions keeps the answer running for seconds (greedy never hits eos on
    this model); Ctrl-C must end the answer, not the chat."""
    from edgellm.compiler import BuildOptions, build

    pexpect = pytest.importorskip("pexpect")
    make_tiny_model(tmp_path / "hf", "qwen2", tied=False, scale=3.0, embed_boost=20.0)
    art = build(tmp_path / "hf", tmp_path / "long", BuildOptions(kv_cache_len=4096))
    child = pexpect.spawn(sys.executable, ["-m", "edgellm.cli", "chat", str(art),
                                           "--max-new-tokens", "100000", "--engine", "numpy"],
                          encoding="utf-8", timeout=60,
                          # as from a terminal: a runner started in the background (`cmd &`)
                          # passes SIGINT down ignored, and Python then keeps it ignored
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect("you> ")
    child.sendline("hello world")
    child.expect("hello world\r\n")  # the echo; the answer (mostly blank pieces) follows
    time.sleep(0.8)  # well inside the ~2.5 s answer (a busier machine only makes it longer)
    child.sendintr()
    child.expect(r"\[stopped after \d+ token\(s\): the answer so far stays in the conversation")
    child.expect("you> ")
    child.sendline("/stats")  # issue 33, item 9: the stopped turn counts, marked
    child.expect(r"\[this conversation: 1 turn\(s\), 1 stopped \| KV cache \d+ of 4096")
    child.expect(r"generated [1-9]\d* tokens")
    child.expect("you> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_with_a_prompt_cache_reads_the_system_prompt_back_in_a_new_session(tiny, tmp_path):
    """chat --prompt-cache: the first session stores its first prompt; a new session (a new
    engine, as after a restart) restores the shared system prompt from disk for its first turn."""
    from edgellm.runtime import prompt_store as ps
    from edgellm.runtime.prefix_cache import PrefixCache

    system = "be brief " * 4  # the tiny tokenizer: about 50 tokens with the template
    hits = []
    for question in ("hello world", "the capital"):
        gen = Generator.load(tiny)
        cache = PrefixCache(gen, slots=0, store=ps.PromptStore(tmp_path / "pc", ps.identity(gen),
                                                               min_tokens=8))
        loop = ChatLoop(gen, SamplingConfig(), 3, system, io.StringIO(), prefix_cache=cache)
        feed = iter([question, "/exit"])
        loop.run(read=lambda prompt: next(feed))
        hits.append((cache.disk_hits, loop.last.reused_tokens))
    assert hits[0] == (0, 0) and hits[1][0] == 1 and hits[1][1] > 30
