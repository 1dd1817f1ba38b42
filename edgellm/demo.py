"""`edgellm demo`: pull the default model, build it once (cached), answer one prompt with stats."""

from __future__ import annotations

import sys

from edgellm.hub.pull import DEFAULT_MODEL, cache_dir, pull


def demo(model: str | None, prompt: str, max_new_tokens: int) -> int:
    from edgellm.build.builder import BuildOptions, build
    from edgellm.runtime.generator import Generator
    from edgellm.runtime.sampler import SamplingConfig

    name = model or DEFAULT_MODEL
    gguf = pull(name)
    artifact = cache_dir() / "artifacts" / f"{name}-s8"
    if not (artifact / "manifest.json").is_file():
        print(f"building {artifact} (once) ...", file=sys.stderr)
        artifact.parent.mkdir(parents=True, exist_ok=True)
        build(gguf, artifact, BuildOptions(kv_cache_len=1023, force=True))
    gen = Generator.load(artifact)
    print(f"> {prompt}")
    result = gen.generate(gen.encode_chat([{"role": "user", "content": prompt}]),
                          SamplingConfig(), max_new_tokens,
                          on_text=lambda piece: print(piece, end="", flush=True))
    print()
    print(f"[{name} s8] ttft {result.ttft_ms:.0f} ms, prefill {result.prefill_tok_s:.1f} tok/s "
          f"({result.prompt_tokens} tokens), decode {result.decode_tok_s:.1f} tok/s "
          f"({len(result.token_ids)} tokens; numpy reference engine)")
    return 0
