#!/usr/bin/env bash
# edgellm beside llama.cpp on weak cores, under emulation: guest instructions per decoded token
# and per prefill token, both engines counted the same way (QEMU user mode, insn_marks.c), on
# the emulated Cortex-A53, A55 and A76 and a first-generation Zen (AVX2 + FMA, no AVX-512, no
# VNNI: QEMU's EPYC-v1), one thread, SmolLM2-135M-Instruct from the same GGUF.
#
#   sudo bash benchmarks/arm/weak_cores.sh      # from the repository's root; after, or instead
#                                               # of, check.sh (it runs check.sh --setup-only)
#
# Emulated instruction counts are not time: they compare how much work each engine's kernels do
# per token on a core without the wide integer instructions of a server. Results:
# docs/PERFORMANCE.md, "Weak cores under emulation".
#
# llama.cpp: its source from the llama-cpp-python sdist on PyPI (0.3.36), llama-bench built
# static (no OpenMP) three times: aarch64 armv8-a (A53: no dotprod), aarch64 armv8.2-a+dotprod+
# fp16 (A55, A76), x86-64 with AVX2/FMA/F16C and no AVX-512 (Zen 1); its llama-quantize (x86,
# run on the host) makes Q8_0 and Q4_0 from the GGUF. Per token from the difference of two runs
# (which cancels loading): decode (-n 24 minus -n 8) / 16, prefill (-p 128 minus -p 64) / 64.
# edgellm: probe.py's marks around 8 decode steps and a 64-token prompt chunk, on each path.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
ARM_WORK=${ARM_WORK:-/var/tmp/edgellm-arm}
ROOT=$ARM_WORK/root
LL=$ARM_WORK/llama
HOST_PY=${HOST_PY:-python3}
CPUS=${CPUS:-"cortex-a53 cortex-a55 cortex-a76 EPYC-v1"}
LLAMA_VERSION=0.3.36
log() { echo "== $*" >&2; }

[[ $(id -u) == 0 ]] || { echo "weak_cores.sh: run as root (check.sh needs it)" >&2; exit 1; }
bash "$REPO/benchmarks/arm/check.sh" --setup-only
for p in gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake; do
    dpkg -s "$p" >/dev/null 2>&1 || { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu \
            g++-aarch64-linux-gnu cmake >/dev/null; break; }
done

SRC=$LL/src/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp
if [[ ! -d $SRC ]]; then
    log "llama.cpp's source (llama-cpp-python $LLAMA_VERSION sdist)"
    mkdir -p "$LL/src"
    "$HOST_PY" -m pip download -q --no-deps --no-binary :all: -d "$LL/src" \
        "llama-cpp-python==$LLAMA_VERSION"
    tar -C "$LL/src" -xzf "$LL/src/llama_cpp_python-$LLAMA_VERSION.tar.gz"
fi

build() {  # name, targets, cmake args...
    local name=$1 targets=$2
    shift 2
    [[ -x $LL/$name/bin/llama-bench ]] && return
    log "llama.cpp for $name (static; 5-15 minutes on 2 cores)"
    cmake -S "$SRC" -B "$LL/$name" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF -DCMAKE_EXE_LINKER_FLAGS=-static "$@" >/dev/null
    # shellcheck disable=SC2086
    cmake --build "$LL/$name" --target $targets -j"$(nproc)" >/dev/null
}
ARM=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64
     -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++)
build x86-avx2 "llama-bench llama-quantize" -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
    -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
build armv8-a llama-bench "${ARM[@]}" -DGGML_CPU_ARM_ARCH=armv8-a
build armv8.2-a-dotprod llama-bench "${ARM[@]}" -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16

GGUF=$("$HOST_PY" -c "from edgellm.hub.pull import pull; print(pull('smollm2-135m-instruct'))")
for kind in Q8_0 Q4_0; do
    [[ -f $LL/smollm2-$kind.gguf ]] ||
        "$LL/x86-avx2/bin/llama-quantize" --allow-requantize "$GGUF" "$LL/smollm2-$kind.gguf" \
            "$kind" >/dev/null 2>&1
done

qemu_for() {  # cpu -> "qemu binary" "llama build"
    case $1 in
        cortex-a53) echo "$ARM_WORK/qemu/qemu-aarch64 armv8-a" ;;
        cortex-a5*|cortex-a7*) echo "$ARM_WORK/qemu/qemu-aarch64 armv8.2-a-dotprod" ;;
        *) echo "$ARM_WORK/qemu/qemu-x86_64 x86-avx2" ;;
    esac
}

count() {  # cpu, out file, command... -> the guest's instructions, all threads, whole run
    local cpu=$1 out=$2 qemu
    shift 2
    read -r qemu _ <<<"$(qemu_for "$cpu")"
    env -i PATH=/usr/bin:/bin HOME=/root "$qemu" -cpu "$cpu" \
        -plugin "$ARM_WORK/qemu/libinsn_marks.so,out=$out" "$@" >/dev/null 2>"$out.log"
    awk '$1 == "exit" {print $2}' "$out"
}

RES=$ARM_WORK/weak
mkdir -p "$RES"
for cpu in $CPUS; do
    read -r _ build <<<"$(qemu_for "$cpu")"
    for kind in Q8_0 Q4_0; do
        line=$RES/$cpu-llama-$kind.json
        [[ -s $line && -z ${FORCE:-} ]] && continue
        log "llama.cpp $kind on $cpu"
        bench=("$LL/$build/bin/llama-bench" -m "$LL/smollm2-$kind.gguf" -t 1 -r 1 --no-warmup)
        d8=$(count "$cpu" "$RES/t" "${bench[@]}" -p 0 -n 8)
        d24=$(count "$cpu" "$RES/t" "${bench[@]}" -p 0 -n 24)
        p64=$(count "$cpu" "$RES/t" "${bench[@]}" -p 64 -n 0)
        p128=$(count "$cpu" "$RES/t" "${bench[@]}" -p 128 -n 0)
        echo "{\"decode\": $(((d24 - d8) / 16)), \"prefill\": $(((p128 - p64) / 64))}" > "$line"
    done
    # s8 and s4 on each path (A53: QGEMM only: MatMulNBits has no 8-bit kernel there, and the
    # s4 layout's lm_head is 8-bit)
    runs="s8@qgemm s4@qgemm"
    [[ $cpu == cortex-a53 ]] || runs="s8@matmulnbits s4@matmulnbits $runs"
    for run in $runs; do
        name=${run%@*} kernel=${run#*@}
        line=$RES/$cpu-edgellm-$name-$kernel.json
        [[ -s $line && -z ${FORCE:-} ]] && continue
        log "edgellm $name --kernel $kernel on $cpu"
        if [[ $cpu == EPYC* ]]; then  # the host's own Python, run by the x86 QEMU
            # (the interpreter itself: QEMU runs ELF files, not a pyenv shim script)
            py=("$("$HOST_PY" -c 'import sys; print(sys.executable)')"
                "$REPO/benchmarks/arm/probe.py")
        else
            py=(-L "$ROOT" "$ROOT/opt/venv/bin/python3" /opt/probe.py)
        fi
        read -r qemu _ <<<"$(qemu_for "$cpu")"
        env -i PATH=/usr/bin:/bin HOME=/root XDG_CACHE_HOME="$RES/cache-$cpu" \
            PYTHONPATH="$([[ $cpu == EPYC* ]] && echo "$REPO")" "$qemu" -cpu "$cpu" \
            -plugin "$ARM_WORK/qemu/libinsn_marks.so,out=$RES/m" "${py[@]}" \
            "$ARM_WORK/art/$name" --engine ort --mark --kernel "$kernel" > "$RES/probe.json" \
            2>"$RES/probe.log" ||
            { echo '{"error": "probe failed"}' > "$line"; continue; }
        "$HOST_PY" - "$RES/m" "$RES/probe.json" > "$line" <<'EOF'
import json, sys
marks = dict(l.split()[:2] for l in open(sys.argv[1]) if l[0].isdigit())
r = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
print(json.dumps({"decode": (int(marks["2"]) - int(marks["1"])) // 8,
                  "prefill": (int(marks["4"]) - int(marks["3"])) // 64,
                  "kernel": r.get("kernel"), "answer": r.get("answer")}))
EOF
    done
done

"$HOST_PY" - "$RES" "$CPUS" <<'EOF'
import json, sys
res, cpus = sys.argv[1], sys.argv[2].split()
def load(cpu, what):
    try:
        return json.load(open(f"{res}/{cpu}-{what}.json"))
    except (OSError, ValueError):
        return {"error": "missing"}
print("| CPU (emulated) | edgellm, path | M instr./decoded token | M instr./prefill token "
      "| llama.cpp | M instr./decoded token | M instr./prefill token "
      "| decode, prefill: llama.cpp / edgellm |")
print("|---|---|---|---|---|---|---|---|")
for cpu in cpus:
    for ours, theirs in (("s8-matmulnbits", "Q8_0"), ("s8-qgemm", "Q8_0"),
                         ("s4-matmulnbits", "Q4_0"), ("s4-qgemm", "Q4_0")):
        a, b = load(cpu, f"edgellm-{ours}"), load(cpu, f"llama-{theirs}")
        if a.get("error") == "missing":
            continue
        if "error" in a or "error" in b:
            print(f"| {cpu} | {ours} | {a.get('error', '')} | | {theirs} | {b.get('error', '')} "
                  f"| | |")
            continue
        path = (a["kernel"] or "").split(" (")[0]
        print(f"| {cpu} | {ours.split('-')[0]}, {path} | {a['decode'] / 1e6:,.1f} "
              f"| {a['prefill'] / 1e6:,.1f} | {theirs} | {b['decode'] / 1e6:,.1f} "
              f"| {b['prefill'] / 1e6:,.1f} | {b['decode'] / a['decode']:.2f}x, "
              f"{b['prefill'] / a['prefill']:.2f}x |")
EOF
