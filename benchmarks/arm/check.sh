#!/usr/bin/env bash
# edgellm on the seed's boards' Arm cores (Cortex-A53, A55, A76), under emulation.
#
#   sudo bash benchmarks/arm/check.sh            # from the repository's root; about 40 minutes
#                                                # the first time, then reuses what it made
#
# Emulated time is not board time: it prints whether each artifact runs, its teacher-forced top-1
# agreement with the x86 numpy reference, the France answer, the guest instructions per decoded
# token (one thread, counted by a QEMU plugin) and whether ONNX Runtime fell back to dequantizing
# per call -- never tok/s. Results: docs/PERFORMANCE.md, "Every layout on the boards' cores".
#
# What it makes, under $ARM_WORK (default /var/tmp/edgellm-arm; delete it with `check.sh --clean`,
# which unmounts first -- a recursive delete through a bind-mounted /dev deletes the host's):
#   qemu/      QEMU 10 (Debian trixie's source) built for aarch64-linux-user with plugins, and
#              benchmarks/arm/insn_marks.c against it. Debian's qemu-user is static, and a static
#              QEMU cannot load plugins; bookworm's 7.2 also passes the host's x86 /proc/cpuinfo
#              through, and onnxruntime dies on import.
#   root/      a Debian bookworm arm64 userland (debootstrap, second stage under bookworm's
#              qemu-user-static via binfmt_misc) with python3 and a venv (/opt/venv, --copies so
#              QEMU can be handed the interpreter) holding this working tree and its aarch64 wheels.
#   art/       SmolLM2-135M-Instruct built on the host in the layouts compared.
# The probes run as `qemu-aarch64 -cpu cortex-aNN -L root ...` (QEMU's own view of the userland:
# it fakes /proc/cpuinfo and the hwcaps for the CPU named); the artifacts are given by their host
# path (ONNX Runtime checks that external data stays inside the model's directory, and QEMU's
# path translation would make /opt/... resolve elsewhere). Results are kept per CPU and artifact
# (FORCE=1 probes again).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
ARM_WORK=${ARM_WORK:-/var/tmp/edgellm-arm}
ROOT=$ARM_WORK/root
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CPUS=${CPUS:-"cortex-a53 cortex-a55 cortex-a76"}
HOST_PY=${HOST_PY:-python3}  # a Python with this tree installed (pip install -e .)
log() { echo "== $*" >&2; }

unmount_all() {
    for m in dev/pts dev sys proc; do
        if mountpoint -q "$ROOT/$m" 2>/dev/null; then umount -l "$ROOT/$m"; fi
    done
}

if [[ ${1:-} == --clean ]]; then
    unmount_all
    rm -rf --one-file-system "$ARM_WORK"
    exit 0
fi
[[ $(id -u) == 0 ]] || { echo "check.sh: run as root (debootstrap, chroot, binfmt_misc)" >&2; exit 1; }
mkdir -p "$ARM_WORK"
trap unmount_all EXIT

host_packages() {
    local need=(qemu-user-static binfmt-support debootstrap gcc ninja-build pkg-config
                libglib2.0-dev python3-venv flex bison xz-utils)
    local missing=()
    for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if ((${#missing[@]})); then
        log "host packages: ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
}

build_qemu() {
    local q=$ARM_WORK/qemu
    [[ -x $q/qemu-aarch64 && -x $q/qemu-x86_64 &&
       $q/libinsn_marks.so -nt $REPO/benchmarks/arm/insn_marks.c ]] && return
    log "QEMU 10 with plugins (Debian trixie's source; 5-15 minutes on 2 cores)"
    mkdir -p "$q/apt/lists/partial" "$q/apt/cache/archives/partial" "$q/src"
    echo "deb-src $MIRROR trixie main" > "$q/apt/sources.list"
    local apt=(-o Dir::Etc::sourcelist="$q/apt/sources.list" -o Dir::Etc::sourceparts=-
               -o Dir::State::Lists="$q/apt/lists" -o Dir::Cache="$q/apt/cache")
    if [[ ! -d $q/src/qemu ]]; then
        apt-get "${apt[@]}" update -qq
        (cd "$q/src" && apt-get "${apt[@]}" source --download-only -qq qemu 2>/dev/null)
        tar -C "$q/src" -xf "$q"/src/qemu_*.orig.tar.xz
        mv "$q"/src/qemu-[0-9]* "$q/src/qemu"
    fi
    [[ -x $q/venv/bin/meson ]] || { python3 -m venv "$q/venv" &&
        "$q/venv/bin/pip" install -q 'meson==1.9.1' 'pycotap==1.3.1'; }
    mkdir -p "$q/src/qemu/build"
    (cd "$q/src/qemu/build" &&
        { grep -q qemu-x86_64 build.ninja 2>/dev/null || ../configure \
            --python="$q/venv/bin/python3" --target-list=aarch64-linux-user,x86_64-linux-user \
            --enable-plugins --disable-docs --disable-werror \
            --disable-tools --disable-system --disable-install-blobs >/dev/null; } &&
        ninja -j"$(nproc)" qemu-aarch64 qemu-x86_64 >/dev/null)
    cp "$q/src/qemu/build/qemu-aarch64" "$q/src/qemu/build/qemu-x86_64" "$q/"
    gcc -shared -fPIC -O2 -Wall $(pkg-config --cflags glib-2.0) -I "$q/src/qemu/include/qemu" \
        -o "$q/libinsn_marks.so" "$REPO/benchmarks/arm/insn_marks.c"
}

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }

userland() {
    if [[ ! -f $ROOT/.edgellm-base ]]; then
        log "arm64 Debian userland (debootstrap; about 10 minutes)"
        [[ -f $ROOT/.edgellm-first-stage ]] || {
            debootstrap --arch=arm64 --foreign --variant=minbase bookworm "$ROOT" "$MIRROR" >/dev/null
            touch "$ROOT/.edgellm-first-stage"; }
        cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
        in_root /debootstrap/debootstrap --second-stage >/dev/null
        touch "$ROOT/.edgellm-base"
    fi
    if [[ ! -x $ROOT/usr/bin/python3 ]]; then
        echo "deb $MIRROR bookworm main" > "$ROOT/etc/apt/sources.list"
        cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
        in_root apt-get update -qq
        in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            python3 python3-venv python3-pip ca-certificates >/dev/null
    fi
    # the host's own CA certificates (a proxy's), or pip fails its certificate checks
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
        in_root update-ca-certificates >/dev/null 2>&1
    fi
    [[ -x $ROOT/opt/venv/bin/python3 ]] || in_root python3 -m venv --copies /opt/venv
    local tree
    tree=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
        xargs -0 sha256sum 2>/dev/null | sha256sum | cut -c1-16)
    if [[ $(cat "$ROOT/opt/src.tree" 2>/dev/null) != "$tree" ]]; then
        log "this working tree into the userland's venv (aarch64 wheels)"
        rm -rf "$ROOT/opt/src" && mkdir -p "$ROOT/opt/src"
        (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
            xargs -0 tar -cf - 2>/dev/null) | tar -C "$ROOT/opt/src" -xf -
        if [[ ! -f $ROOT/opt/venv/.deps ]]; then
            in_root /opt/venv/bin/pip install -q --disable-pip-version-check /opt/src \
                -c /opt/src/constraints.txt
            touch "$ROOT/opt/venv/.deps"
        fi
        in_root /opt/venv/bin/pip install -q --disable-pip-version-check --no-deps \
            --force-reinstall /opt/src
        echo "$tree" > "$ROOT/opt/src.tree"
    fi
    cp "$REPO/benchmarks/arm/probe.py" "$ROOT/opt/probe.py"
}

# name  build flags (SmolLM2-135M-Instruct, built on the host)
# (on a Cortex-A53 the default s8 runs on QGEMM, re-laid at load; the others are the candidates)
LAYOUTS=(
    "s8|--weight-type s8"
    "s4|--weight-type s4"
    "s4-acc1|--weight-type s4 --accuracy-level 1"
    "s4-s4|--weight-type s4 --post-weight-type s4"
    "s4-s4-acc1|--weight-type s4 --post-weight-type s4 --accuracy-level 1"
    "s4-s4-g128|--weight-type s4 --post-weight-type s4 --group-size 128"
    "s4-s4-g128-acc1|--weight-type s4 --post-weight-type s4 --group-size 128 --accuracy-level 1"
)

artifacts() {
    local src
    src=$("$HOST_PY" -c "from edgellm.hub.pull import pull; print(pull('smollm2-135m-instruct'))")
    mkdir -p "$ARM_WORK/art"
    for entry in "${LAYOUTS[@]}"; do
        local name=${entry%%|*} flags=${entry#*|}
        [[ -f $ARM_WORK/art/$name/manifest.json ]] && continue
        log "build $name: $flags"
        # shellcheck disable=SC2086
        "$HOST_PY" -m edgellm build "$src" -o "$ARM_WORK/art/$name" $flags >/dev/null 2>&1
    done
}

probe() {  # cpu name -> one JSON line, with "insns_per_token" and "ort_fell_back" added
    local cpu=$1 name=$2 out=$ARM_WORK/results/$1-$2
    mkdir -p "$ARM_WORK/results"
    if [[ $cpu == host ]]; then
        "$HOST_PY" "$REPO/benchmarks/arm/probe.py" "$ARM_WORK/art/$name" --engine ort \
            >"$out.json" 2>"$out.log"
    else
        env -i PATH=/usr/bin:/bin HOME=/root "$ARM_WORK/qemu/qemu-aarch64" -cpu "$cpu" -L "$ROOT" \
            -plugin "$ARM_WORK/qemu/libinsn_marks.so,out=$out.marks" \
            "$ROOT/opt/venv/bin/python3" /opt/probe.py "$ARM_WORK/art/$name" --engine ort --mark \
            >"$out.json" 2>"$out.log" || { echo "{\"error\": \"exit $?\"}" >"$out.json"; }
    fi
    "$HOST_PY" - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
try:
    r = json.loads(open(out + ".json").read().strip().splitlines()[-1])
except (IndexError, ValueError):
    r = {"error": "no result"}
try:
    marks = dict(line.split() for line in open(out + ".marks"))
    r["insns_per_token"] = (int(marks["2"]) - int(marks["1"])) / 8
    r["insns_per_prefill_token"] = (int(marks["4"]) - int(marks["3"])) / 64
except (OSError, KeyError, ValueError):
    pass
r["ort_fell_back"] = "Falling back to using unpacked compute mode" in open(out + ".log").read()
print(json.dumps(r))
EOF
}

report() {
    "$HOST_PY" - "$ARM_WORK" "$CPUS" "${LAYOUTS[@]}" <<'EOF'
import json, subprocess, sys
work, cpus, layouts = sys.argv[1], sys.argv[2].split(), [e.split("|")[0] for e in sys.argv[3:]]
def load(cpu, name):
    return json.loads(open(f"{work}/results/{cpu}-{name}.line").read())
print("| CPU | artifact | runs | top-1 agreement with x86 numpy | answer | M instructions/token "
      "| ORT fell back | edgellm predicted |")
print("|---|---|---|---|---|---|---|---|")
for cpu in ["host"] + cpus:
    for name in layouts:
        r, ref = load(cpu, name), load("numpy", name)
        if "error" in r:
            print(f"| {cpu} | {name} | no: {r['error']} | | | | | |")
            continue
        same = sum(a == b for a, b in zip(r["top1"], ref["top1"]))
        insns = f"{r['insns_per_token'] / 1e6:,.0f}" if "insns_per_token" in r else "(host)"
        pred = "; ".join(r["predicted_slow"]) or "kernel"
        if r.get("qgemm_graphs"):
            n = r["qgemm_graphs"]
            pred += f" ({n} graph{'s' if n > 1 else ''} on QGEMM)"
        print(f"| {cpu} | {name} | yes | {same}/{len(ref['top1'])} | {r['answer']!r} | {insns} "
              f"| {'yes' if r['ort_fell_back'] else 'no'} | {pred} |")
EOF
}

host_packages
mkdir -p "$ARM_WORK/results"
build_qemu
[[ ${1:-} == --qemu-only ]] && exit 0
userland
artifacts
[[ ${1:-} == --setup-only ]] && exit 0
for entry in "${LAYOUTS[@]}"; do
    name=${entry%%|*}
    "$HOST_PY" "$REPO/benchmarks/arm/probe.py" "$ARM_WORK/art/$name" --engine numpy \
        > "$ARM_WORK/results/numpy-$name.line" 2>/dev/null
    for cpu in host $CPUS; do
        line=$ARM_WORK/results/$cpu-$name.line
        if [[ -z ${FORCE:-} && $line -nt $ARM_WORK/art/$name/manifest.json ]] &&
            ! grep -q '"error"' "$line"; then continue; fi
        log "probe $cpu $name"
        probe "$cpu" "$name" > "$ARM_WORK/results/$cpu-$name.line"
    done
done
report
