"""The compiler: read a source checkpoint (HF directory or GGUF), write an edgellm artifact.

    from edgellm.compiler import BuildOptions, build
    build("model.gguf", "model-s8", BuildOptions(weight_type="s8"))
"""

from __future__ import annotations

import time
from pathlib import Path

from edgellm.compiler.builder import BuildOptions, compile_artifact, log, peak_rss, quieted
from edgellm.compiler.check import check_artifact

__all__ = ["BuildOptions", "build"]


def build(input_path: str | Path, output: str | Path, opts: BuildOptions,
          quiet: bool = False) -> Path:
    """`edgellm build`: compile, run --check-level 2's checks if asked, and end with a line of
    time, size on disk and peak memory (`quiet`: only the progress bar and errors)."""
    start = time.perf_counter()
    out = compile_artifact(input_path, output, opts, quiet=quiet)
    seconds = time.perf_counter() - start
    with quieted(quiet):
        if opts.check_level >= 2:
            check_artifact(out, input_path, opts.check_prompt)
        on_disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        log(f"built {out} in {seconds:.1f} s: {on_disk / 1e6:,.1f} MB on disk, peak RSS "
            f"{peak_rss() / 1e9:.2f} GB")
    return out
