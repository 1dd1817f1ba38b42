#!/usr/bin/env bash
# llama.cpp's own server (llama-server), built from the llama.cpp source that the pinned
# llama-cpp-python sdist carries, with this host's CPU flags (AVX-512 ones only where cpuinfo lists
# them: a native build's AMX code dies with SIGILL in these VMs, AVX-512 code on a Zen 1), for
# side-by-side runs such as benchmarks/bfcl.py --llama-server.
#   bash benchmarks/build_llama_server.sh [WORKDIR]   # prints the binary's path
set -euo pipefail
WORK=${1:-/var/tmp/edgellm-llama-server}
mkdir -p "$WORK"
SRC=$(ls -d "$WORK"/llama_cpp_python-0.3.36/vendor/llama.cpp 2>/dev/null || true)
if [ -z "$SRC" ]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$WORK"
    tar -xzf "$WORK"/llama_cpp_python-0.3.36.tar.gz -C "$WORK"
    SRC="$WORK"/llama_cpp_python-0.3.36/vendor/llama.cpp
fi
FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF
       -DGGML_AMX_INT8=OFF)
has() { grep -qw "$1" /proc/cpuinfo; }
if has avx512f; then FLAGS+=(-DGGML_AVX512=ON); fi
if has avx512_vnni; then FLAGS+=(-DGGML_AVX512_VNNI=ON); fi
if has avx512_bf16; then FLAGS+=(-DGGML_AVX512_BF16=ON); fi
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release "${FLAGS[@]}" -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >"$WORK/cmake.log"
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >"$WORK/build.log"
echo "$WORK/build/bin/llama-server"
