"""`edgellm serve`: bind the port, load the model, say where it listens, log each request."""

from __future__ import annotations

import errno
import socket
import sys
import threading
from pathlib import Path

from edgellm.artifact.inspect import layout_label
from edgellm.errors import EdgeLLMError
from edgellm.machine import warn_if_busy
from edgellm.runtime.cache_reuse import MIN_RUN as CACHE_REUSE
from edgellm.runtime.generator import Generator
from edgellm.runtime.prompt_store import open_store
from edgellm.server.app import create_app
from edgellm.server.request_log import RequestLog


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line error (port in use, unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise EdgeLLMError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise EdgeLLMError(f"port {port} on {host} is already in use (another server?); "
                               f"choose another with --port") from None
        raise EdgeLLMError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _cache_type_word(engine) -> str:
    """"int8 " for an int8 KV cache, nothing for the fp32 one."""
    cache_type = getattr(engine, "cache_type", "fp32")
    return "" if cache_type == "fp32" else f"{cache_type} "


def banner(urls: list[str], name: str, gen, api_key: str | None) -> str:
    m = gen.artifact.manifest
    url = urls[0]
    return "\n".join([
        f"edgellm serve: {name} ({layout_label(m.weight_scheme, m.post_scheme)}, "
        f"{type(gen.engine).__name__}, {gen.engine.kv_cache_len}-position "
        f"{_cache_type_word(gen.engine)}KV cache, "
        f"{getattr(gen.engine, 'slots', 1)} at once)",
        *([f"  kernel      {gen.engine.kernel.line()}"] if hasattr(gen.engine, "kernel") else []),
        f"  OpenAI API  {url}/v1   model \"{name}\", "
        + ("API key required (Authorization: Bearer KEY)" if api_key else "no API key needed"),
        f"  Ollama API  {url}      model \"{name if ':' in name else name + ':latest'}\" "
        f"(a hub's Ollama integration, the ollama client)",
        f"  web page    {url}/",
        *([f"  also at     {', '.join(urls[1:])}"] if urls[1:] else []),
        "  Ctrl-C stops",
    ])


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def _addresses() -> list[str]:
    """This machine's addresses others may reach it at: the one its default route leaves from
    (a UDP socket's local end once "connected", nothing sent), its host name's, loopback."""
    found = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routed by the default route, never sent
            found.append(s.getsockname()[0])
    except OSError:
        pass
    try:
        found += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None,
                                                            socket.AF_INET)]
    except OSError:
        pass
    found.append("127.0.0.1")
    return list(dict.fromkeys(a for a in found if not a.startswith("169.254.")))


def _urls(host: str, sock: socket.socket) -> list[str]:
    """Where the server can be opened: the host given, or for a wildcard host (0.0.0.0, ::)
    the machine's reachable addresses (http://0.0.0.0:PORT opens nothing)."""
    port = sock.getsockname()[1]
    hosts = _addresses() if _wildcard(host) else [host]
    return [f"http://{f'[{h}]' if ':' in h else h}:{port}" for h in hosts]


def _open_to_others(host: str) -> bool:
    """Whether clients on other machines can connect (not loopback only)."""
    import ipaddress

    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to
        try:
            return any(not ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return True


MAX_PARALLEL = 4


# serve's context when --ctx-size is not given: llama-server's default, and room for what a home
# hub sends (its devices, states and tools: 3,000 tokens in benchmarks/prompt_cache.py's prompt)
SERVE_CONTEXT = 4096


def serve_context(art, cache_type: str = "fp32") -> int | None:
    """The context `serve` runs an Artifact with without --ctx-size: SERVE_CONTEXT positions
    (the artifact's if it was built longer; at most the trained context) where one such KV cache
    fits beside the weights; None (the artifact's own) otherwise, said on stderr."""
    from edgellm.runtime.context import context_length

    built = art.manifest.kv_cache_len
    wanted = min(SERVE_CONTEXT, art.config.max_position_embeddings)
    if wanted <= built:
        return None
    try:
        return context_length(art, wanted, cache_type=cache_type)
    except EdgeLLMError as e:  # no memory for it, or a model that cannot run that long
        print(f"edgellm serve: serving the artifact's {built:,}-position context, not "
              f"{wanted:,} ({e})", file=sys.stderr, flush=True)
        return None


def slots_for(art, parallel: int | None, engine: str = "auto",
              context: int | None = None, cache_type: str = "fp32") -> int:
    """--parallel checked against an Artifact and free memory; None: as many as fit, at most
    MAX_PARALLEL (each slot is one more KV cache; the weights are shared)."""
    from edgellm.compiler.memory import footprint, machine_memory

    m, cfg = art.manifest, art.config
    batched = engine == "numpy" or not m.graphs or m.graphs.get("batch", False)
    if parallel is not None and parallel < 1:
        raise EdgeLLMError("--parallel must be at least 1")
    if not batched:
        if parallel and parallel > 1:
            raise EdgeLLMError(f"{art.path} was built before graphs took a batch (2026-12-02): "
                               f"it serves one request at a time; rebuild it for --parallel "
                               f"{parallel}")
        return 1
    kv = footprint(cfg, art.weight_scheme, art.post_scheme, context or m.kv_cache_len,
                   cache_type=cache_type).kv_cache
    _, available = machine_memory()
    weights = sum(m.files[f]["size"] for f in [*m.layers, m.post])
    fit = max(1, int((available - weights) * 0.5 // kv))  # half of what is left, for the rest
    if parallel is None:
        return min(MAX_PARALLEL, fit)
    if parallel > fit:
        raise EdgeLLMError(f"--parallel {parallel} needs {parallel} KV caches of "
                           f"{kv / 1e6:.0f} MB beside {weights / 1e9:.2f} GB of weights; "
                           f"{available / 1e9:.1f} GB are free: use --parallel {fit} or less")
    return parallel


def warm_request(path: str):
    """A --warm file as the chat request it stands for: a JSON request body (its messages and
    tools) or plain text (the system message). Read before the model loads, so a bad file
    fails at once."""
    import json

    from pydantic import ValidationError

    from edgellm.server.schemas import ChatRequest

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"--warm {path}: {e}") from None
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        if not text.strip():
            raise EdgeLLMError(f"--warm {path}: the file is empty")
        body = {"messages": [{"role": "system", "content": text}]}
    try:
        return ChatRequest(**{**body, "model": body.get("model", "")})
    except (ValidationError, TypeError) as e:
        raise EdgeLLMError(f"--warm {path}: not a chat request ({str(e).splitlines()[0]})") \
            from None


def warm_ids(gen, path: str, request=None) -> list[int]:
    """The prompt ids of a --warm file, rendered as the server renders a request."""
    from edgellm.server.errors import APIError
    from edgellm.server.steps import encode_chat

    try:
        return encode_chat(gen, request or warm_request(path))[0]
    except APIError as e:
        raise EdgeLLMError(f"--warm {path}: not a chat request ({e})") from None


def _grammar_while_loading(art):
    """A Future of the model's tool-call grammar tokenizer, made in a thread of its own while
    the engine loads: it took the first request with tools after a restart 1.3-1.5 s on the
    AVX2-only host (llguidance's token trie), a hub's first request after every restart."""
    import atexit
    from concurrent.futures import Future, wait

    from edgellm.chat.constrained import ToolCallGrammar
    from edgellm.text import ModelText

    done: Future = Future()

    def build():
        try:
            done.set_result(ToolCallGrammar.for_text(ModelText.from_artifact(art),
                                                     art.manifest.config["vocab_size"]))
        except BaseException as e:  # noqa: BLE001 (the first request that needs it says why)
            done.set_exception(e)

    threading.Thread(target=build, daemon=True, name="edgellm-grammar").start()
    # the thread is in native code: the interpreter must not exit under it, whichever way serve
    # ends (a damaged artifact's one-line error, then exit, died with SIGSEGV)
    atexit.register(wait, [done])
    return done


def serve(artifact: str, host: str, port: int, api_key: str | None, model_name: str | None,
          max_queue: int, upstream=None, quiet: bool = False, verify: bool = False,
          tool_grammar: bool = True, speculate: str = "auto", parallel: int | None = None,
          prefill_budget: int | None = None, prompt_cache: str | None = None,
          prompt_cache_size: int = 2 << 30, warm: list[str] = (), cache_reuse: int = CACHE_REUSE,
          tool_system: str | None = None, check_calls: float | None = None,
          **engine_opts) -> None:
    import uvicorn

    from edgellm.artifact.reader import load_artifact

    art = load_artifact(artifact)  # its manifest, for the context and the slots
    cache_type = engine_opts.get("cache_type", "fp32")
    if engine_opts.get("ctx_size") is None:
        engine_opts["ctx_size"] = serve_context(art, cache_type)
    slots = slots_for(art, parallel, engine_opts.get("engine", "auto"),
                      engine_opts.get("ctx_size"), cache_type)
    sock = bind(host, port)  # before the model loads: a busy port fails at once
    warm_requests = [warm_request(path) for path in warm]  # and a bad --warm file
    warn_if_busy(engine_opts.get("threads"), "serve decodes")
    grammar = _grammar_while_loading(art) if tool_grammar else None
    gen = Generator.load(artifact, verify=verify, slots=slots, **engine_opts)
    name = model_name or Path(artifact).name
    store = open_store(gen, prompt_cache, prompt_cache_size) if prompt_cache else None
    app = create_app(gen, name, api_key, max_queue, upstream=upstream, tool_grammar=tool_grammar,
                     tool_system=tool_system, check_calls=check_calls,
                     speculate=speculate, prefill_budget=prefill_budget, prompt_store=store,
                     cache_reuse=cache_reuse, grammar_build=grammar)
    text = banner(_urls(host, sock), name, gen, api_key)
    if not api_key and _open_to_others(host):
        print(f"edgellm: warning: --host {host} without --api-key: anyone who can reach this "
              f"machine on port {sock.getsockname()[1]} can use the model (give --api-key KEY, "
              f"or --host 127.0.0.1 for this machine alone)", file=sys.stderr, flush=True)
    for path, request in zip(warm, warm_requests):  # after the load, before the first request
        ids = warm_ids(gen, path, request)
        read = app.state.served.slots[0].prefix_cache.warm(ids)
        print(f"edgellm serve: warmed {path}: {len(ids)} tokens ({read} read from the cache, "
              f"{len(ids) - read} prefilled)", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:
                print(text, file=sys.stderr, flush=True)

        def handle_exit(self, sig, frame):
            # a requested stop: running generations stop at their next token and their clients
            # get an error (a stream: an error event), so connections close at once, not after
            # the grace period's cancelled tasks and tracebacks
            app.state.served.close()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if captured is not None:  # not raised again after shutdown: exit status 0
                captured.clear()

    # on SIGTERM/Ctrl-C: connections still open after 5 s are closed
    config = uvicorn.Config(app if quiet else RequestLog(app), log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    Server(config).run(sockets=[sock])
