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
Every row stands beside its physical limit (edgellm.runtime.roofline): the bytes one decoded
token reads (edgellm: the weights as its engine holds them; llama.cpp: the GGUF's tensors but
the embedding, and its f16 K/V), the read bandwidth measured here with the same threads over a
buffer that size, the roofline (the decode speed no engine reading those bytes can beat) and
the share of it reached; --llama-cpp source,Q8_0,Q4_0 runs llama.cpp on the pulled Q4_K_M file
as it is (what Ollama users run) beside its own re-quantizations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from edgellm.bench import bench
from edgellm.demo import cached_artifact
from edgellm.hub.pull import DEFAULT_MODEL, cache_dir, pull
from edgellm.runtime.cpu import read_cpu
from edgellm.runtime.roofline import read_bandwidth


def gguf_bytes_per_token(gguf: Path, depth: int) -> int:
    """What llama.cpp reads for one decoded token of a GGUF at `depth` positions: every tensor
    but the token embedding (of which it reads one row), or with it where the file has no
    output matrix (tied: the embedding is the lm_head); and its f16 K and V up to the depth."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    tensors = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(n for name, n in tensors.items() if name != "token_embd.weight")
    if "output.weight" not in tensors:
        total += tensors["token_embd.weight"]
    field = lambda key: int(reader.fields[key].parts[-1][0])  # noqa: E731
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    layers, heads = field(f"{arch}.block_count"), field(f"{arch}.attention.head_count")
    kv_heads = field(f"{arch}.attention.head_count_kv")
    head_dim = field(f"{arch}.embedding_length") // heads
    return total + depth * 2 * layers * kv_heads * head_dim * 2


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
    p.add_argument("--llama-cpp", metavar="FILES", help="llama.cpp's files, comma-separated, "
                   "the first the ratios' base: source (the pulled GGUF as it is), Q8_0, Q4_0, "
                   "Q4_K_M, ... (default: Q8_0 for s8, Q4_0 for s4)")
    p.add_argument("--cmake-args", action="store_true", help="print llama.cpp's build flags "
                                                             "for this CPU and exit")
    a = p.parse_args()
    if a.cmake_args:
        print(cmake_args())
        return

    kind = {"s8": "Q8_0", "s4": "Q4_0"}[a.weight_type]
    artifacts = [Path(x) for x in a.artifact] or [cached_artifact(DEFAULT_MODEL, a.weight_type)]
    source = pull(DEFAULT_MODEL)
    files = {name: source if name == "source" else llama_cpp_quantized(source, name)
             for name in (a.llama_cpp.split(",") if a.llama_cpp else [kind])}

    ours = {(art, k): bench(str(art), a.prompt_tokens, a.gen_tokens, a.repeats,
                            threads=a.threads, kernel=k)
            for art in artifacts for k in a.kernels.split(",")}
    depth = a.prompt_tokens + a.gen_tokens // 2
    theirs = {}
    for name, gguf in files.items():
        r = bench_llama_cpp(gguf, a.threads, a.prompt_tokens, a.gen_tokens, a.repeats)
        r["bytes_per_token"] = gguf_bytes_per_token(gguf, depth)
        r["read_bandwidth_gb_s"] = read_bandwidth(r["bytes_per_token"], a.threads)["gb_s"]
        r["roofline_tok_s"] = r["read_bandwidth_gb_s"] * 1e9 / r["bytes_per_token"]
        r["decode_of_roofline"] = r["decode_tok_s"] / r["roofline_tok_s"]
        theirs[name] = r
    base = theirs[next(iter(theirs))]

    print(f"model {DEFAULT_MODEL}, {a.threads} threads, prompt {a.prompt_tokens}, "
          f"generate {a.gen_tokens}, median of {a.repeats}; bytes per token at position {depth}; "
          f"each roofline from the read bandwidth measured here over a buffer of that size; "
          f"ratios against llama.cpp {next(iter(theirs))}")
    print("| engine | prefill tok/s | decode tok/s | MB read per token | read GB/s | roofline "
          "tok/s | decode of roofline | vs llama.cpp (prefill, decode) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(f"edgellm {r['weight_type']}{f' ({art.name})' if a.artifact else ''}, --kernel "
             f"{kernel}: {r['engine']}", r) for (art, kernel), r in ours.items()]
    rows += [(f"llama.cpp {'the source file (' + source.name + ')' if n == 'source' else n}", r)
             for n, r in theirs.items()]
    for label, r in rows:
        print(f"| {label} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} "
              f"| {r['bytes_per_token'] / 1e6:.0f} | {r['read_bandwidth_gb_s']:.1f} "
              f"| {r['roofline_tok_s']:.1f} | {r['decode_of_roofline']:.0%} "
              f"| {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x, "
              f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x |")
    for (art, kernel), r in ours.items():
        if "int8_gemm_gops" in r:
            print(f"\nedgellm {art.name} --kernel {kernel}: prefill {r['prefill_gops']:.0f} GOPS in "
                  f"the layers' matmuls, {r['prefill_of_gemm']:.0%} of ONNX Runtime's integer "
                  f"GEMM here ({r['int8_gemm_gops']:.0f} GOPS, {r['int8_gemm_shape']})")
    print(f"\nhost: {read_cpu().name}; {llama_flags_note()}")


def llama_flags_note() -> str:
    return f"llama.cpp expected built with: {cmake_args()}"


if __name__ == "__main__":
    main()
