"""How close an artifact is to its source: the unquantized reference (the source compiled as
fp32 and run by the numpy engine), `edgellm eval --reference` and `build --check-level 2`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from edgellm.compiler.builder import BuildOptions, compile_artifact, log
from edgellm.compiler.memory import NotEnoughMemory
from edgellm.eval import SHORT_TEXT, Quality, evaluate


class ReferenceModel:
    """The unquantized source, built as fp32 weights + fp32 hidden state into a temporary
    artifact and run by the numpy reference engine (removed on close)."""

    def __init__(self, source: str | Path, context: int):
        from edgellm.artifact.reader import load_artifact
        from edgellm.runtime.engine import NumpyEngine

        self._tmp = Path(tempfile.mkdtemp(prefix="edgellm-reference-"))
        log(f"eval: building the unquantized reference, an fp32 copy of {source}, in "
            f"{self._tmp} (removed afterwards)")
        try:
            out = compile_artifact(source, self._tmp / "reference", BuildOptions(
                kv_cache_len=context, weight_type="fp32", hidden_state_type="fp32"),
                quiet=True, label="eval: reference")
            self.engine = NumpyEngine(load_artifact(out))
        except BaseException:
            self.close()
            raise

    def close(self):
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def evaluate_artifact(artifact: str | Path, text: str, reference_source: str | Path | None = None,
                      context: int | None = None, stride: int | None = None,
                      max_tokens: int | None = None, **engine_opts) -> Quality:
    from edgellm.runtime.generator import Generator

    return evaluate_generator(Generator.load(artifact, **engine_opts), text, reference_source,
                              context, stride, max_tokens)


def evaluate_generator(gen, text: str, reference_source: str | Path | None = None,
                       context: int | None = None, stride: int | None = None,
                       max_tokens: int | None = None) -> Quality:
    """evaluate_artifact on an artifact already loaded (a runtime.generator.Generator)."""
    ids = gen.tokenizer.encode(text, add_special_tokens=False).ids[:max_tokens]
    context = min(context or gen.engine.kv_cache_len, gen.engine.kv_cache_len)
    if reference_source is None:
        return evaluate(gen.engine, ids, context, stride)
    with ReferenceModel(reference_source, context) as ref:
        return evaluate(gen.engine, ids, context, stride, ref.engine)


def check_artifact(output: Path, source: str | Path, prompt: str):
    """--check-level 2: a chat prompt, then `edgellm eval --reference` on a short built-in
    text, on one load of the artifact."""
    from edgellm.runtime.generator import Generator
    from edgellm.runtime.sampler import SamplingConfig

    gen = Generator.load(output)
    result = gen.generate(gen.encode_chat([{"role": "user", "content": prompt}]),
                          SamplingConfig(), max_new_tokens=32)
    log(f"check prompt {prompt!r} -> {result.text!r}")
    try:
        quality = evaluate_generator(gen, SHORT_TEXT, reference_source=source)
    except NotEnoughMemory as e:  # the fp32 reference, not the artifact: report, don't fail
        log(f"check quality: no comparison with the unquantized source, whose fp32 copy does "
            f"not fit: {e}")
        quality = evaluate_generator(gen, SHORT_TEXT)
    log(f"check quality on a short text: {quality.summary()}")
