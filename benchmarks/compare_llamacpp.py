"""edgellm s8 vs llama.cpp Q8_0 (or s4 vs Q4_0) on the same model, threads and lengths, in one run.

    CMAKE_ARGS="$(python benchmarks/compare_llamacpp.py --cmake-args)" \
        pip install llama-cpp-python==0.3.36   # builds llama.cpp from source (10-20 min)
    python benchmarks/compare_llamacpp.py --threads 2 [--weight-type s4] [--kernels auto,matmulnbits]
                                          [--artifact ART ...]

--cmake-args prints the llama.cpp build flags for this CPU: AVX2/FMA/F16C, AVX-512 (VNNI, BF16)
only where /proc/cpuinfo lists them (AVX-512 code dies with SIGILL on an AVX2-only Zen 1) and
never AMX (listed in some VMs that cannot run it) or a native build.
--kernels: one edgellm row per path of its 8-bit weights (runtime.kernels), e.g. the measured
choice beside MatMulNBits alone, in the same run.

Both sides start from the Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF that `edgellm pull` fetches:
llama.cpp re-quantizes it to Q8_0 (Q4_0) with its own quantize API, edgellm builds its default
s8 (s4) artifact; --artifact runs other builds of the same GGUF instead (another --group-size,
say), each with every --kernels path, against the same llama.cpp run.
Also prints the read-bandwidth roofline measured here: the decode speed no engine can beat when
it reads every weight byte once per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgellm.bench import bench
from edgellm.demo import cached_artifact
from edgellm.hub.pull import DEFAULT_MODEL, cache_dir, pull
from edgellm.runtime.cpu import read_cpu


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s for summing a buffer much larger than the caches, split over `threads`."""
    data = np.ones(int(gib * 2**30) // 8, np.float64)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, data.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def weight_bytes_per_token(artifact: Path) -> int:
    """Bytes of the layers' linear weights and the lm_head: what one decode step reads."""
    files = json.loads((artifact / "manifest.json").read_text())["files"]
    total = 0
    for name, f in files.items():
        if name.endswith(".bin") and name != "model.embed_tokens.weight.bfloat16.bin":
            total += f["size"]
    return total


def cmake_args(flags: set[str] | None = None) -> str:
    """llama.cpp's CMake flags for this CPU (or for the cpuinfo flags given)."""
    if flags is None:
        from edgellm.runtime.cpu import read_cpu

        flags = set(read_cpu().features)
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF"]
    for flag, option in (("avx2", "AVX2"), ("fma", "FMA"), ("f16c", "F16C"),
                         ("avx512f", "AVX512"), ("avx512_vnni", "AVX512_VNNI"),
                         ("avx512_bf16", "AVX512_BF16"), ("avx_vnni", "AVX_VNNI")):
        args.append(f"-DGGML_{option}={'ON' if flag in flags else 'OFF'}")
    return " ".join(args)


def llama_cpp_quantized(gguf: Path, kind: str) -> Path:
    import llama_cpp

    out = cache_dir() / "models" / (gguf.stem + f".{kind}.gguf")
    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
        params.allow_requantize = True
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(out).encode(), params) != 0:
            sys.exit("llama.cpp quantize failed")
    return out


def bench_llama_cpp(gguf: Path, threads: int, prompt_tokens: int, gen_tokens: int,
                    repeats: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=prompt_tokens + gen_tokens + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=prompt_tokens, verbose=False)
    prompt = (llm.tokenize(b"The edge device reads every weight once per token. ", False)
              * prompt_tokens)[:prompt_tokens]
    prefill, decode = [], []
    for _ in range(repeats + 1):  # the first pass warms up
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - t)
        token = prompt[-1]  # decode cost does not depend on which token is fed
        t = time.perf_counter()
        for _ in range(gen_tokens - 1):
            llm.eval([token])
        decode.append((gen_tokens - 1) / (time.perf_counter() - t))
    return {"prefill_tok_s": round(prompt_tokens / statistics.median(prefill[1:]), 2),
            "decode_tok_s": round(statistics.median(decode[1:]), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--weight-type", choices=("s8", "s4"), default="s8")
    p.add_argument("--kernels", default="auto", help="edgellm's paths to run, comma-separated")
    p.add_argument("--artifact", action="append", default=[], metavar="ART",
                   help="edgellm artifacts to run (default: the cached default build)")
    p.add_argument("--cmake-args", action="store_true", help="print llama.cpp's build flags "
                                                             "for this CPU and exit")
    a = p.parse_args()
    if a.cmake_args:
        print(cmake_args())
        return

    kind = {"s8": "Q8_0", "s4": "Q4_0"}[a.weight_type]
    artifacts = [Path(x) for x in a.artifact] or [cached_artifact(DEFAULT_MODEL, a.weight_type)]
    theirs_gguf = llama_cpp_quantized(pull(DEFAULT_MODEL), kind)

    bw = read_bandwidth(a.threads)
    ours = {(art, k): bench(str(art), a.prompt_tokens, a.gen_tokens, a.repeats,
                            threads=a.threads, kernel=k)
            for art in artifacts for k in a.kernels.split(",")}
    theirs = bench_llama_cpp(theirs_gguf, a.threads, a.prompt_tokens, a.gen_tokens, a.repeats)

    print(f"model {DEFAULT_MODEL}, {a.threads} threads, prompt {a.prompt_tokens}, "
          f"generate {a.gen_tokens}, median of {a.repeats}")
    for art in artifacts:
        per_token = weight_bytes_per_token(art)
        print(f"read bandwidth {bw:.1f} GB/s; {art.name}: weights read per token "
              f"{per_token / 1e9:.3f} GB; roofline {bw * 1e9 / per_token:.1f} tok/s")
    print("| engine | prefill tok/s | decode tok/s | vs llama.cpp (prefill, decode) |")
    print("|---|---|---|---|")
    for (art, kernel), r in ours.items():
        name = f" {art.name}" if a.artifact else ""
        print(f"| edgellm {a.weight_type}{name}, --kernel {kernel}: {r['engine']} "
              f"| {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} "
              f"| {r['prefill_tok_s'] / theirs['prefill_tok_s']:.2f}x, "
              f"{r['decode_tok_s'] / theirs['decode_tok_s']:.2f}x |")
    print(f"| llama.cpp {kind} | {theirs['prefill_tok_s']:.1f} | {theirs['decode_tok_s']:.1f} "
          f"| |")
    print(f"\nhost: {read_cpu().name}; {llama_flags_note()}")


def llama_flags_note() -> str:
    return f"llama.cpp expected built with: {cmake_args()}"


if __name__ == "__main__":
    main()
