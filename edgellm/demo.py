"""`edgellm demo`: pull the default model, build it once (cached), answer one prompt with stats."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgellm.artifact.format import FORMAT_VERSION, MANIFEST_NAME
from edgellm.hub.pull import DEFAULT_MODEL, cache_dir, pull


def artifact_dir(name: str, layout: str = "s8") -> Path:
    """Where the cache keeps a model's build of `layout` (`build`'s default -o too)."""
    return cache_dir() / "artifacts" / f"{name}-{layout}"


def cached_artifact(name: str, weight_type: str = "s8") -> Path:
    """The artifact of a known model in the cache, (re)built when missing or outdated."""
    from edgellm.compiler import BuildOptions, build

    gguf = pull(name)
    artifact = artifact_dir(name, weight_type)
    opts = BuildOptions(kv_cache_len=1023, weight_type=weight_type, force=True)
    if not _up_to_date(artifact / MANIFEST_NAME, opts):
        print(f"building {artifact} (once) ...", file=sys.stderr)
        artifact.parent.mkdir(parents=True, exist_ok=True)
        build(gguf, artifact, opts)
    return artifact


def _up_to_date(manifest: Path, opts) -> bool:
    """Built by this format, with the layout `opts` asks for today (s4's default changed)."""
    if not manifest.is_file():
        return False
    m = json.loads(manifest.read_text())
    scheme, post = opts.schemes()
    return (m.get("format_version") == FORMAT_VERSION
            and m.get("weight_scheme") == scheme.to_dict()
            and m.get("post_scheme") == post.to_dict())


def demo(model: str | None, prompt: str, max_new_tokens: int, **engine_opts) -> int:
    from edgellm.runtime.generator import Generator
    from edgellm.runtime.sampler import SamplingConfig

    name = model or DEFAULT_MODEL
    gen = Generator.load(cached_artifact(name), **engine_opts)
    print(f"> {prompt}")
    result = gen.generate(gen.encode_chat([{"role": "user", "content": prompt}]),
                          SamplingConfig(), max_new_tokens,
                          on_text=lambda piece: print(piece, end="", flush=True))
    print()
    kernel = getattr(gen.engine, "kernel", None)  # runtime.kernels: the 8-bit weights' path
    engine = type(gen.engine).__name__ + (f" on {kernel.label()}" if kernel else "")
    print(f"[{name} s8, {engine}] ttft {result.ttft_ms:.0f} ms, prefill "
          f"{result.prefill_tok_s:.1f} tok/s ({result.prompt_tokens} tokens), decode "
          f"{result.decode_tok_s:.1f} tok/s ({len(result.token_ids)} tokens)")
    return 0
