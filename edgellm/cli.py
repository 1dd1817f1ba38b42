"""edgellm: compile small LLMs (a Hugging Face directory or a GGUF file) into int8/int4 edge
artifacts, and chat with them, serve them over the OpenAI API and measure them on this CPU.

Start with `edgellm demo`; `edgellm COMMAND --help` explains each command."""

# Argument parsing only; each subcommand calls one function of the API.

from __future__ import annotations

import argparse
import json
import sys
import time

from edgellm.errors import EdgeLLMError
from edgellm.quant.schemes import SCHEMES

HIDDEN_TYPES = ("bf16", "fp16", "fp32")


class _Help(argparse.HelpFormatter):
    """Shows each option's default, unless it has none or its help already says it; wraps
    prose paragraphs and keeps indented lists (known models, boards) as written."""

    def _fill_text(self, text, width, indent):
        import textwrap

        return "\n\n".join(
            para if para.splitlines()[-1].startswith(" ") else
            textwrap.fill(" ".join(para.split()), width, initial_indent=indent,
                          subsequent_indent=indent)
            for para in text.split("\n\n"))

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative")
    return n


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not at least 1")
    return n


def _probability(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        p = float("nan")
    if not 0 < p < 1:  # (nan fails this too)
        raise argparse.ArgumentTypeError(f"{text} is not a probability between 0 and 1")
    return p


def _command(sub, name: str, summary: str, description: str | None = None, **kw):
    return sub.add_parser(name, help=summary, description=description or summary,
                          formatter_class=_Help, **kw)


def _add_build(sub):
    p = _command(sub, "build", "compile a HF directory or GGUF file into an artifact",
                 "Compile a Hugging Face model directory or a GGUF file into an edge artifact "
                 "directory (per-layer integer weights, ONNX graphs, bf16 embedding table, "
                 "tokenizer, manifest). The vendor's underscore spellings (--input_path, "
                 "--kv_cache_len, ...) are accepted too.")
    p.add_argument("input", nargs="?", help="HF model directory, .gguf file, or a model name "
                                            "`edgellm pull` knows (pulled if needed)")
    p.add_argument("-o", "--output", "--output_path", "--output-path", dest="output",
                   metavar="DIR", help="the artifact directory to write (must not exist, "
                                       "unless --force); default: the cache's artifacts "
                                       "folder, named after the model and layout")
    p.add_argument("--input_path", "--input-path", dest="input_path", help=argparse.SUPPRESS)
    p.add_argument("--weight-type", "--weight_type", default=None, choices=sorted(SCHEMES),
                   help="decoder layers' weights: s8 (int8), s4 (int4: group 32 and an s8 "
                        "lm_head unless --group-size / --post-weight-type say otherwise), "
                        "or a float type (default: s8, or --target's choice)")
    p.add_argument("--target", choices=sorted(_boards()),
                   help="the board it will run on: the layout is chosen for its cores (ONNX "
                        "Runtime kernels) and RAM, and checked if given")
    p.add_argument("--post-weight-type", "--post_weight_type", choices=sorted(SCHEMES),
                   help="weight type of the lm_head (default: s8 for s4 layers, else "
                        "--weight-type)")
    p.add_argument("--group-size", "--group_size", type=int, default=None, metavar="N",
                   help="input channels per scale of the --weight-type's weights: 32, 64, "
                        "128, ... (default: 32 for s4, 128 otherwise; an s4 build's s8 "
                        "lm_head and --keep-s8 layers are laid out as s8's: 128, symmetric)")
    p.add_argument("--keep-s8", metavar="LAYERS",
                   help='layers kept at s8 in an s4 build, e.g. "0,1,-2--1" (first and last two)')
    p.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                   help="ONNX graphs: MatMulNBits accuracy_level (4: int8 activations inside "
                        "the matmul, fast; 0: fp32)")
    zero = p.add_mutually_exclusive_group()
    zero.add_argument("--asymmetric", dest="asymmetric", action="store_true", default=None,
                      help="integer weights with a zero point per group (default for s4)")
    zero.add_argument("--symmetric", dest="asymmetric", action="store_false",
                      help="integer weights with a scale per group only (default for s8)")
    p.add_argument("--quant-method", choices=("rtn", "gptq"), default="rtn",
                   help="integer weights: round to nearest, or GPTQ (fitted to the inputs each "
                        "layer sees on a calibration text; slower build, better s4)")
    p.add_argument("--calibration", metavar="TEXT_FILE",
                   help="GPTQ calibration text (default: a built-in mix of prose, code and chat)")
    p.add_argument("--calibration-tokens", type=int, default=32768, metavar="N",
                   help="GPTQ: tokens of the calibration text used (far fewer over-fit it)")
    p.add_argument("--kv-cache-len", "--kv_cache_len", type=int, default=1023, metavar="N",
                   help="positions in the KV cache: the longest prompt + answer")
    p.add_argument("--prefill-len", "--prefill_len", type=int, default=None, metavar="N",
                   help="tokens per prefill chunk (default: 128, or the KV cache length if less)")
    p.add_argument("--hidden-state-type", "--hidden_state_type", default="bf16",
                   choices=HIDDEN_TYPES, help="activations between layers and the KV cache")
    p.add_argument("--model-config", "--model_config", metavar="JSON",
                   help="the vendor's model-config JSON; its fields override the source's config")
    p.add_argument("--no-memory-check", action="store_true",
                   help="build even when the model looks too large for this machine's RAM")
    p.add_argument("--check-level", "--check_level", type=int, default=0, choices=(0, 1, 2),
                   help="0: just build; 1: each quantized layer against its float original; "
                        "2: also answer --check-prompt and compare with the source on a short text")
    p.add_argument("--check-prompt", default="1+1=", metavar="TEXT", help="the prompt of --check-level 2")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_build)


def _add_thinking(p):
    p.add_argument("--thinking", choices=("on", "off"),
                   help="a thinking model's reasoning (the template's enable_thinking, as Qwen3's "
                        "reads it; default: the template's own)")


def _template_kwargs(a) -> dict:
    return {} if a.thinking is None else {"enable_thinking": a.thinking == "on"}


def _add_sampling(p):
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="stop after this many generated tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide recent tokens' logits by this (1: off)")
    p.add_argument("--penalty-window", type=int, default=20, metavar="N",
                   help="recent tokens the repetition penalty looks at")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    _add_speculate(p)


def _add_speculate(p):
    p.add_argument("--speculate", default="auto", choices=("auto", "lookup", "off"),
                   help="prompt lookup: draft tokens from the text so far and verify several in "
                        "one forward (same answer as plain decoding); auto pauses it where "
                        "drafts keep failing")


def _add_engine(p):
    p.add_argument("--engine", default="auto", choices=("auto", "ort", "numpy"),
                   help="ort: ONNX Runtime graphs (auto picks it when the artifact has them); "
                        "numpy: the reference engine")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: one per physical core)")
    p.add_argument("--providers", default=None,
                   help="comma-separated ONNX Runtime execution providers "
                        "(default: CPUExecutionProvider)")
    p.add_argument("--kernel", default="auto",
                   choices=("auto", "mixed", "matmulnbits", "qgemm"),
                   help="the path of integer weights: matmulnbits (the graphs as built), qgemm "
                        "(re-laid at load for ONNX Runtime's integer GEMM; 4-bit ones as int8, "
                        "twice their bytes), auto (the faster "
                        "here, measured at the first load on this CPU and cached), mixed (auto, "
                        "and prompt chunks on the other path where it measured faster: the "
                        "layers' weights loaded twice, perplexity about +0.3%%; decode on "
                        "matmulnbits where it is as fast, as its rounding is the smaller)")
    p.add_argument("--allow-slow-kernels", action="store_true",
                   help="with --kernel matmulnbits: run even where ONNX Runtime has no 8-bit "
                        "kernel on this CPU (it dequantizes every weight per token)")
    p.add_argument("--ctx-size", type=int, default=None, metavar="N",
                   help="positions of the KV cache (prompt + answer), up to the model's trained "
                        "context; default: the artifact's --kv-cache-len (serve: 4096, or the "
                        "artifact's if longer, where memory holds it). No rebuild: the graphs "
                        "are changed at load")
    p.add_argument("--cache-type", default="fp32", choices=("fp32", "int8"),
                   help="the KV cache's type: fp32 (default), or int8 with one scale per channel "
                        "(a quarter of the bytes: 4x the context or the slots in the same memory; "
                        "its scales measured at the model's first load with it, 8-30 s, then "
                        "cached). Measured on Qwen2.5-Coder 0.5B and 1.5B over 2,000 tokens (AVX2 "
                        "host, docs/PERFORMANCE.md): mean KL 0.006-0.014 to the fp32 cache's "
                        "next-token distributions, perplexity +0.2-0.8%%, decode 1.0-1.1x, long "
                        "prompts 0.7-1.0x. The ONNX Runtime engine's; opt-in, as llama.cpp's "
                        "-ctk q8_0 is")


def _add_prompt_cache(p):
    from edgellm.runtime.cache_reuse import MIN_RUN as CACHE_REUSE

    p.add_argument("--prompt-cache", metavar="DIR",
                   help="keep the K/V of long prompt prefixes (a system prompt, a tool list) in "
                        "DIR and reuse them after a restart; only token ids and their K/V are "
                        "written, owner-only")
    p.add_argument("--cache-reuse", type=int, default=CACHE_REUSE, metavar="N",
                   help="past a change in the middle of a cached prompt (a device's state), "
                        "reuse runs of at least N tokens it still has, moved to their new "
                        "positions (an approximation: logits within a few %% of a cold run's, "
                        "measured); 0: only the shared prefix, exact")


def _engine_opts(a) -> dict:
    providers = a.providers.split(",") if a.providers else None
    return {"engine": a.engine, "threads": a.threads, "providers": providers,
            "allow_slow_kernels": a.allow_slow_kernels, "kernel": a.kernel,
            "ctx_size": a.ctx_size, "cache_type": a.cache_type}


ARTIFACT_HELP = ("an artifact directory (made by edgellm build), or a model `edgellm pull` "
                 "knows: its s8 build in the cache, pulled and built the first time")
_TAKES_ARTIFACT = {"run", "chat", "serve", "bench", "eval", "inspect"}


def _known_model(name: str) -> bool:
    """Whether a command's input names a model `edgellm pull` knows (and no path here)."""
    from pathlib import Path

    from edgellm.hub.pull import MODELS

    return name in MODELS and not Path(name).exists()


def _artifact(a):
    """A model `edgellm pull` knows, given where an artifact goes (`chat qwen2.5-coder-0.5b-
    instruct`), is its s8 build in the cache, pulled and built the first time as `demo` does;
    `serve` then answers to the model's name. Anything else is left to the artifact reader."""
    if _known_model(a.artifact):
        from edgellm.demo import cached_artifact

        if a.command == "serve" and a.model_name is None:
            a.model_name = a.artifact
        a.artifact = str(cached_artifact(a.artifact))


def _add_run(sub):
    p = _command(sub, "run", "answer one prompt with an artifact")
    p.add_argument("artifact", help=ARTIFACT_HELP)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--system", help="system message")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt as is "
                   "(base models; BOS added where the tokenizer adds one)")
    _add_thinking(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true", help="check every file's sha256 first")
    _add_prompt_cache(p)
    p.add_argument("--json-schema", metavar="FILE",
                   help="decode the answer under this JSON Schema (the text always parses and "
                        "validates); '{}' in the file means any JSON object")
    _add_sampling(p)
    _add_engine(p)
    p.set_defaults(func=cmd_run)


def _add_misc(sub):
    p = _command(sub, "inspect", "show an artifact's manifest")
    p.add_argument("artifact", help=ARTIFACT_HELP)
    p.add_argument("--verify", action="store_true", help="check every file's sha256")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.add_argument("--files", action="store_true",
                   help="list every file with its size and checksum (default: by kind)")
    p.add_argument("--vendor-config", action="store_true",
                   help="print the vendor's model-config JSON for this artifact")
    p.set_defaults(func=cmd_inspect)

    p = _command(sub, "bench", "measure prefill / decode speed, TTFT and memory")
    p.add_argument("artifact", help=ARTIFACT_HELP)
    p.add_argument("--prompt-tokens", type=int, default=128, metavar="N",
                   help="prompt length prefilled")
    p.add_argument("--gen-tokens", type=int, default=128, metavar="N",
                   help="tokens decoded (greedy, never stopping early)")
    p.add_argument("--repeats", type=int, default=3, help="runs; the medians are printed")
    p.add_argument("--json", action="store_true", help="print one JSON object of medians")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="decode an answer to this file's text (a user message) instead of a "
                        "fixed prompt; with --speculate, plain and speculative in the same run")
    _add_speculate(p)
    _add_engine(p)
    p.set_defaults(func=cmd_bench)

    p = _command(sub, "chat", "talk to an artifact in the terminal (KV cache kept)")
    p.add_argument("artifact", help=ARTIFACT_HELP)
    p.add_argument("--system", help="system message")
    _add_thinking(p)
    p.add_argument("--verify", action="store_true", help="check every file's sha256 first")
    _add_prompt_cache(p)
    _add_sampling(p)
    _add_engine(p)
    p.set_defaults(func=cmd_chat)

    p = _command(sub, "serve", "OpenAI and Ollama APIs over HTTP, and a web chat page")
    p.add_argument("artifact", help=ARTIFACT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--model-name", default=None, help="name served (default: directory name)")
    p.add_argument("--max-queue", type=_count, default=8, help="waiting requests before 429")
    p.add_argument("--parallel", type=_count, default=None, metavar="N",
                   help="requests generated at once, their decode steps batched, each with a KV "
                        "cache of its own (default: as many as fit in free memory, at most 4; "
                        "1 for artifacts built before batched graphs)")
    p.add_argument("--prefill-budget", type=_positive, default=None, metavar="TOKENS",
                   help="with --parallel: prompt tokens prefilled (new requests' prompts, in "
                        "chunks) before the decoding requests get their next step; larger "
                        "favours new requests' first token, smaller the running streams "
                        "(default: the artifact's prefill chunk, 128 unless built otherwise)")
    _add_prompt_cache(p)
    p.add_argument("--warm", action="append", metavar="FILE",
                   help="prefill this prompt at start and keep it (repeatable): a system prompt "
                        "as plain text, or a chat request body in JSON (messages and tools); "
                        "with --prompt-cache read from there when it was stored before")
    p.add_argument("--prompt-cache-size", default="2GB", metavar="SIZE",
                   help="with --prompt-cache: the most it holds on disk, least recently used "
                        "files removed first (e.g. 2GB, 512MB)")
    p.add_argument("--quiet", action="store_true", help="no line per request")
    p.add_argument("--tool-system-prompt", metavar="TEXT|@FILE",
                   help="the system message of a request that offers tools and sends none of "
                        "its own (@FILE: read from a file); docs/AGENTS.md measures one")
    p.add_argument("--check-calls", type=_probability, metavar="P", default=None,
                   help="ask the model, after each call it makes under tool_choice auto, whether "
                        "that function is the right way to answer (one more short prompt), and "
                        "answer in words where its p(yes) is below P: fewer calls where no tool "
                        "fits, on models that can tell (docs/AGENTS.md: Qwen2.5-Coder-1.5B at "
                        "0.6; the 0.5B cannot)")
    p.add_argument("--no-tool-grammar", action="store_true",
                   help="leave tool_choice auto unconstrained (the lazy grammar keeps every call "
                        "the model opens valid; this is for measuring what it is worth)")
    p.add_argument("--verify", action="store_true",
                   help="check every file's sha256 before serving (a sample of each file is "
                        "checked at every load anyway)")
    p.add_argument("--upstream", default=None,
                   help="OpenAI-compatible base URL (…/v1) answering other models and prompts "
                        "over the local context")
    p.add_argument("--upstream-key", default=None, help="API key sent upstream")
    p.add_argument("--upstream-model", default=None, help="model name to send upstream")
    _add_speculate(p)
    _add_engine(p)
    p.set_defaults(func=cmd_serve)

    from edgellm.hub.pull import DEFAULT_MODEL, MODELS

    known = "\n".join(f"  {line}" for line in _known_models())
    p = _command(sub, "pull", "download a known model into the cache, print its path",
                 epilog=f"known models:\n{known}\n\nor a Hugging Face repo id "
                        "(needs huggingface_hub and a network that reaches the Hub)")
    p.add_argument("name", nargs="?", help="a known model (below); without one, list them")
    p.set_defaults(func=cmd_pull)

    p = _command(sub, "demo", "pull + build (cached) + answer one prompt")
    p.add_argument("--model", default=None, choices=sorted(MODELS),
                   help=f"a known model (default: {DEFAULT_MODEL})")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="stop after this many generated tokens")
    _add_engine(p)
    p.set_defaults(func=cmd_demo)


def _exit_on_sigterm():
    """`kill` (SIGTERM) raises SystemExit, so cleanups run as for Ctrl-C: an interrupted build
    (also demo's) leaves neither an artifact nor its temporary directory, nor pull its download."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def cmd_build(a) -> int:
    from pathlib import Path

    from edgellm.compiler import BuildOptions, build
    from edgellm.demo import artifact_dir
    from edgellm.hub.pull import MODELS

    source = a.input or a.input_path
    if not source:
        raise EdgeLLMError(f"build needs an input: a HF model directory, a .gguf file or a "
                           f"model `edgellm pull` knows ({', '.join(MODELS)})")
    name, source = _source(source)
    output = a.output or artifact_dir(name, a.weight_type or a.target or "s8")
    opts = BuildOptions(kv_cache_len=a.kv_cache_len, prefill_len=a.prefill_len,
                        weight_type=a.weight_type, post_weight_type=a.post_weight_type,
                        group_size=a.group_size, asymmetric=a.asymmetric,
                        hidden_state_type=a.hidden_state_type,
                        check_level=a.check_level, check_prompt=a.check_prompt, force=a.force,
                        memory_check=not a.no_memory_check, model_config=a.model_config,
                        keep_s8=a.keep_s8, accuracy_level=a.accuracy_level,
                        quant_method=a.quant_method, calibration=a.calibration,
                        calibration_tokens=a.calibration_tokens, target=a.target)
    if not a.output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    out = build(source, output, opts)
    print(out)
    return 0


def _sampling(a):
    from edgellm.runtime.sampler import SamplingConfig

    return SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          repetition_penalty=a.repetition_penalty,
                          penalty_window=a.penalty_window, seed=a.seed)


def _cache_reuse(a) -> int:
    if a.cache_reuse < 0:
        raise EdgeLLMError(f"--cache-reuse must be 0 (off) or more, not {a.cache_reuse}")
    return a.cache_reuse


def _disk_cache(gen, a):
    """run/chat --prompt-cache DIR: a prefix cache over the store on disk, or None."""
    if not a.prompt_cache:
        return None
    from edgellm.runtime.prefix_cache import PrefixCache
    from edgellm.runtime.prompt_store import open_store

    return PrefixCache(gen, slots=0, store=open_store(gen, a.prompt_cache, 2 << 30),
                       reuse=_cache_reuse(a))


def cmd_run(a) -> int:
    from edgellm.runtime.generator import Generator

    sampling = _sampling(a)
    _cache_reuse(a)  # checked before the model loads
    gen = Generator.load(a.artifact, verify=a.verify, **_engine_opts(a))
    if a.raw:
        ids = gen.tokenizer.encode(a.prompt).ids
    else:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + \
                   [{"role": "user", "content": a.prompt}]
        ids = gen.encode_chat(messages, **_template_kwargs(a))
    mask = _schema_mask(gen, a.json_schema) if a.json_schema else None
    stream = None if a.json else (lambda piece: print(piece, end="", flush=True))
    cache = _disk_cache(gen, a)
    start = time.perf_counter()
    if cache is not None:
        cache.prepare(ids)
    preparing = time.perf_counter() - start  # the prefix read, runs moved, a change computed
    result = gen.generate(ids, sampling, a.max_new_tokens, on_text=stream, mask=mask,
                          speculate=a.speculate, reuse_cache=cache is not None)
    result.ttft_ms = round(result.ttft_ms + preparing * 1000, 2)
    if cache is not None:
        cache.remember(ids)
        cache.flush()
    if a.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print()
        s = result.speculation
        drafts = (f" | drafts: {s.accepted}/{s.proposed} accepted, "
                  f"{len(result.token_ids) / max(s.forwards, 1):.2f} tokens/forward") if s else ""
        print(f"ttft: {result.ttft_ms:.2f} ms | prefill: {result.prompt_tokens} tokens, "
              f"{result.prefill_tok_s:.2f} tok/s | decode: {len(result.token_ids)} tokens, "
              f"{result.decode_tok_s:.2f} tok/s | stop: {result.stop_reason}{drafts}",
              file=sys.stderr)
    return 0


def _read_text(path: str) -> str:
    from pathlib import Path

    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"{path}: {e}") from None


def _schema_mask(gen, path: str):
    from pathlib import Path

    from edgellm.chat.constrained import ToolCallGrammar

    try:
        schema = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeLLMError(f"--json-schema {path}: {e}") from None
    if not isinstance(schema, dict):
        raise EdgeLLMError(f"--json-schema {path}: a JSON Schema is an object")
    return ToolCallGrammar.for_generator(gen).json_schema(schema or None)


def cmd_inspect(a) -> int:
    from edgellm.artifact.inspect import describe
    from edgellm.artifact.reader import load_artifact

    art = load_artifact(a.artifact, verify=a.verify)
    if a.vendor_config:
        from edgellm.compiler.vendor_config import vendor_config

        print(json.dumps(vendor_config(art.config, art.path.name), indent=2))
    else:
        print(art.manifest.to_json() if a.json else describe(art, a.files) + _kernel_here(art))
    if a.verify:
        total = sum(f["size"] for f in art.manifest.files.values())
        print(f"verified: all {len(art.manifest.files)} files ({total / 1e6:,.1f} MB) match "
              "their sha256 in the manifest", file=sys.stderr if a.json or a.vendor_config
              else sys.stdout)
    return 0


def _kernel_here(art) -> str:
    """inspect's line on the path of the 8-bit weights on this CPU (runtime.kernels), as
    cached by a load with the default threads."""
    if not art.manifest.graphs:
        return ""
    from edgellm.runtime.generator import physical_cores
    from edgellm.runtime.kernels import here

    return f"\nkernel here     {here(art, physical_cores())}"


def _add_quality(sub):
    p = _command(sub, "eval", "perplexity on a text; agreement with the unquantized source")
    p.add_argument("artifact", help=ARTIFACT_HELP)
    p.add_argument("--perplexity", metavar="FILE", help="text file to score (default: a short "
                                                         "built-in passage)")
    p.add_argument("--reference", metavar="SRC", help="the unquantized source (HF dir or GGUF): "
                                                       "top-1 agreement and mean KL against it")
    p.add_argument("--context", type=int, help="tokens per window (default: the KV cache)")
    p.add_argument("--stride", type=int, help="new tokens scored per window (default: half)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_engine(p)
    p.set_defaults(func=cmd_eval)

    from edgellm.boards import memory_spec
    from edgellm.runtime.cpu import CORE_FEATURES

    boards = "\n".join(f"  {k:10s} {v.note}: {memory_spec(v)}" for k, v in _boards().items())
    p = _command(sub, "plan", "will it fit a device, and its decode ceiling, per weight type",
                 epilog=f"boards:\n{boards}")
    p.add_argument("artifact", help="an artifact, or before a build a .gguf file, a HF model "
                                    "directory or a model `edgellm pull` knows (its s8 build in "
                                    "the cache once made)")
    p.add_argument("--board", choices=sorted(_boards()), help="a preset: RAM and bandwidth")
    p.add_argument("--ram", help="device RAM, e.g. 2GB or 512MB; a bare number is GB "
                                 "(overrides the board's)")
    p.add_argument("--bandwidth", help="memory bandwidth, e.g. 17GB/s; a bare number is GB/s "
                                       "(overrides the board's)")
    p.add_argument("--ctx-size", "--kv-cache-len", dest="kv_cache_len", type=int, metavar="N",
                   help="positions of the KV cache to plan for (default: the artifact's)")
    p.add_argument("--cache-type", default="fp32", choices=("fp32", "int8"),
                   help="the KV cache's type to plan for (run, chat, serve --cache-type)")
    p.add_argument("--cpu", choices=sorted(CORE_FEATURES),
                   help="the device's cores, for the kernel column (default: the board's, or "
                        "this machine's)")
    p.add_argument("--parallel", type=_count, default=1, metavar="N",
                   help="requests served at once (`serve --parallel`): N KV caches")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)


def _boards() -> dict:
    from edgellm.boards import BOARDS

    return BOARDS


def cmd_eval(a) -> int:
    from pathlib import Path

    from edgellm.compiler.check import evaluate_artifact
    from edgellm.eval import SHORT_TEXT

    try:
        text = Path(a.perplexity).read_text() if a.perplexity else SHORT_TEXT
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"--perplexity {a.perplexity}: {e}") from None
    quality = evaluate_artifact(a.artifact, text, a.reference, a.context, a.stride, a.max_tokens,
                                **_engine_opts(a))
    print(json.dumps(quality.to_json()) if a.json else quality.summary())
    return 0


def cmd_plan(a) -> int:
    from edgellm.plan import BOARDS, parse_size, plan, table

    board = BOARDS.get(a.board)
    if not board and not (a.ram and a.bandwidth):
        raise EdgeLLMError("plan needs --board NAME, or --ram and --bandwidth; boards: "
                           + ", ".join(f"{k} ({v.note})" for k, v in BOARDS.items()))
    ram = parse_size(a.ram, "--ram") if a.ram else board.ram
    if ram is None or (not a.bandwidth and board.bandwidth is None):
        raise EdgeLLMError(f"--board {a.board} ({board.note}) has no known RAM and memory "
                           f"bandwidth to go by: give --ram and --bandwidth too (its cores, "
                           f"{board.cpu}, still decide the kernel column)")
    if a.bandwidth:
        bandwidth = parse_size(a.bandwidth, "--bandwidth", per_second=True)
        basis = "as given (--bandwidth)"
    else:
        from edgellm.boards import sustained

        bandwidth, basis = sustained(board)
    art, cfg, kv = _planned(a.artifact)
    kv = a.kv_cache_len or kv
    if a.kv_cache_len is not None:
        from edgellm.runtime.context import check_trained

        check_trained(cfg, a.kv_cache_len)
    import onnxruntime

    from edgellm.runtime.cpu import Cpu, read_cpu

    cpu = Cpu.core(a.cpu) if a.cpu else Cpu.core(board.cpu) if board else read_cpu()
    if a.parallel < 1:
        raise EdgeLLMError("--parallel must be at least 1")
    rows = plan(cfg, kv, ram, bandwidth, art, cpu, onnxruntime.__version__, a.parallel,
                a.cache_type)
    if a.json:
        print(json.dumps({"ram": ram, "bandwidth": bandwidth, "bandwidth_basis": basis,
                          "cpu": cpu.name, "kv_cache_len": kv, "cache_type": a.cache_type,
                          "built": art is not None,
                          "rows": rows}))
    else:
        if art is None:
            print(f"{a.artifact}: not built yet; every layout from the source's shapes, as "
                  f"`edgellm build` would write it")
        print(board.note if board and not a.cpu else
              f"cores: {cpu.name} ({'--cpu' if a.cpu else 'this machine, as no --board or --cpu'}"
              f" says which the kernel column is for)")
        print(f"bandwidth: {bandwidth / 1e9:.1f} GB/s, {basis}")
        print(table(rows, ram, bandwidth, kv, a.parallel, a.cache_type))
    return 0


def _source(path: str):
    """(a name for it, its path) of a build's or plan's input: a path that exists, or a model
    `edgellm pull` knows (pulled if needed); anything else is a one-line error."""
    from pathlib import Path

    from edgellm.hub.pull import MODELS, pull

    if _known_model(path):
        return path, pull(path)
    if not Path(path).exists():
        raise EdgeLLMError(f"{path} does not exist, and is not a model `edgellm pull` knows "
                           f"({', '.join(MODELS)})")
    return Path(path).name.removesuffix(".gguf"), Path(path)


def _planned(path: str):
    """(artifact or None, model config, its KV cache length) of what `plan` was given: an
    artifact (a model `edgellm pull` knows whose s8 build is in the cache stands for that build,
    as where the other commands take an artifact), or before a build a GGUF file, a HF directory
    or a known model (pulled if needed), at build's default context."""
    from pathlib import Path

    from edgellm.artifact.format import MANIFEST_NAME
    from edgellm.artifact.reader import load_artifact
    from edgellm.compiler import BuildOptions
    from edgellm.compiler.sources import open_source
    from edgellm.demo import artifact_dir

    if _known_model(path) and (artifact_dir(path) / MANIFEST_NAME).is_file():
        path = str(artifact_dir(path))
    if (Path(path) / MANIFEST_NAME).is_file():
        art = load_artifact(path)
        return art, art.config, art.manifest.kv_cache_len
    return None, open_source(_source(path)[1]).config, BuildOptions().kv_cache_len


def _text_or_file(value: str | None, option: str) -> str | None:
    """An option's text, or with a leading @ the text of that file (as curl's -d @FILE)."""
    if value is None or not value.startswith("@"):
        return value or None
    try:
        return _read_text(value[1:])
    except EdgeLLMError as e:
        raise EdgeLLMError(f"{option}: {e}") from None


def cmd_bench(a) -> int:
    from edgellm.bench import bench, markdown

    prompt = _read_text(a.prompt_file) if a.prompt_file else None
    result = bench(a.artifact, a.prompt_tokens, a.gen_tokens, a.repeats, prompt=prompt,
                   speculate=a.speculate, **_engine_opts(a))
    print(json.dumps(result) if a.json else markdown(result))
    return 0


def cmd_chat(a) -> int:
    from edgellm.chat.repl import ChatLoop
    from edgellm.runtime.generator import Generator

    sampling = _sampling(a)
    _cache_reuse(a)  # checked before the model loads
    gen = Generator.load(a.artifact, verify=a.verify, **_engine_opts(a))
    ChatLoop(gen, sampling, a.max_new_tokens, a.system, speculate=a.speculate,
             template_kwargs=_template_kwargs(a), prefix_cache=_disk_cache(gen, a)).run()
    return 0


def cmd_serve(a) -> int:
    from edgellm.plan import parse_size
    from edgellm.server.serving import serve
    from edgellm.server.upstream import Upstream

    upstream = Upstream(a.upstream, a.upstream_key, a.upstream_model) if a.upstream else None
    serve(a.artifact, a.host, a.port, a.api_key, a.model_name, a.max_queue, upstream,
          quiet=a.quiet, verify=a.verify, tool_grammar=not a.no_tool_grammar,
          speculate=a.speculate, parallel=a.parallel, prefill_budget=a.prefill_budget,
          prompt_cache=a.prompt_cache, warm=a.warm or (), cache_reuse=_cache_reuse(a),
          tool_system=_text_or_file(a.tool_system_prompt, "--tool-system-prompt"),
          check_calls=a.check_calls,
          prompt_cache_size=int(parse_size(a.prompt_cache_size, "--prompt-cache-size")),
          **_engine_opts(a))
    return 0


def _known_models(mark_pulled: bool = False) -> list[str]:
    """One line per known model; `mark_pulled`: which are in the cache already."""
    from edgellm.hub.pull import DEFAULT_MODEL, MODELS, pulled

    def tags(name, m) -> str:
        found = ["default"] if name == DEFAULT_MODEL else []
        if mark_pulled and pulled(name):
            found.append("pulled")
        return f" ({', '.join(found)})" if found else ""

    return [f"{name:30s} {m.description}, {m.size / 1e6:,.0f} MB{tags(name, m)}"
            for name, m in MODELS.items()]


def cmd_pull(a) -> int:
    from edgellm.hub.pull import pull

    if not a.name:
        print("\n".join(_known_models(mark_pulled=True)))
        return 0
    print(pull(a.name))
    return 0


def cmd_demo(a) -> int:
    from edgellm.demo import demo

    return demo(a.model, a.prompt, a.max_new_tokens, **_engine_opts(a))


def parser() -> argparse.ArgumentParser:
    from edgellm import __version__

    p = argparse.ArgumentParser(prog="edgellm", description=__doc__, formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"edgellm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    _add_run(sub)
    _add_misc(sub)
    _add_quality(sub)
    p.commands = sub.choices
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but an unknown option is reported with its subcommand's usage."""
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:
        p.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _silence_stdout():
    """The reader of our output went away (`edgellm inspect --json | head`): stop writing,
    quietly, as other command-line tools do."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _exit_on_sigterm()
    try:
        if args.command in _TAKES_ARTIFACT:
            _artifact(args)
        return args.func(args)
    except BrokenPipeError:
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left
    except EdgeLLMError as e:
        print(f"edgellm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgellm: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions: the user's to fix, not a bug
        print(f"edgellm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
