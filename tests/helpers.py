"""Shared test helpers: tiny random HF checkpoints made from configs, the CLI runner, and a
uvicorn server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TINY = dict(vocab_size=300, hidden_size=80, intermediate_size=200, num_hidden_layers=2,
            num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=50000.0)


MINICPM = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 16}


def write_tokenizer(directory: Path) -> None:
    """A small byte-level BPE tokenizer (trained here) with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the capital of france is paris", "hello world " * 5], trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None,
        "pad_token": "<|endoftext|>", "add_bos_token": False}))


def make_tiny_model(directory: Path, arch: str, tied: bool, seed: int = 0, scale: float = 1.0,
                    embed_boost: float = 0.0, **config):
    """A random-weight HF checkpoint (bf16 safetensors) of `arch`; returns the torch model
    in float32 holding exactly the stored (bf16-representable) weights.

    `embed_boost` adds a shared random component to the embedding and lm_head rows, which makes
    the next-token distribution peaked like a trained model's (random logits are nearly tied)."""
    import torch
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    if arch == "minicpm":  # not in transformers: a llama checkpoint with MiniCPM's config
        model = make_tiny_model(directory, "llama", tied, seed, scale, embed_boost, **config)
        cfg = json.loads((directory / "config.json").read_text())
        cfg.update(model_type="minicpm", architectures=["MiniCPMForCausalLM"], **MINICPM)
        (directory / "config.json").write_text(json.dumps(cfg))
        return model  # computes llama's logits, not MiniCPM's (see test_parity)
    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "phi3": Phi3Config,
                  "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig}[arch]
    config = config_cls(**{**TINY, **config}, tie_word_embeddings=tied,
                        initializer_range=0.02 * scale, eos_token_id=2, bos_token_id=None,
                        pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02 * scale)  # biases and norms too, not just 0/1
        shared = torch.randn_like(model.get_input_embeddings().weight) * 0.02 * embed_boost
        model.get_input_embeddings().weight.add_(shared)
        if not tied:
            model.lm_head.weight.add_(shared)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    directory.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory)
    # reload rather than cast back: casting would also round the rope inv_freq buffer to bf16
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def edgellm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def said(stderr: str) -> list[str]:
    """What a command printed on stderr, less `serve`'s and `bench`'s warning that other work
    keeps the CPUs busy: that one depends on what else the host runs (a benchmark, a CI job)."""
    return [line for line in stderr.splitlines()
            if not line.startswith("edgellm: warning: other work keeps")]


def assert_idle(scheduler, seconds: float = 10.0) -> None:
    """Wait up to `seconds` for the server's scheduler to have no request in line or running
    (a client that left must free its place), then assert it."""
    import time

    deadline = time.monotonic() + seconds
    while scheduler.pending and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scheduler.pending == 0


def start_server(app, **config):
    """(server, thread, base URL) of `app` served by uvicorn on a free loopback port, once it
    is up; stop it with `server.should_exit = True` and `thread.join()`."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           **{"log_level": "warning", **config}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def serve_process(*args, env=None) -> tuple[subprocess.Popen, list[str]]:
    """`edgellm serve ARGS` in a process of its own, once it has printed its start lines
    (returned); stop it with a signal, as a user would."""
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", *map(str, args)],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "Ctrl-C stops" in line:
            break
    return proc, lines
