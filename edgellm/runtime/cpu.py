"""Which CPU this is, and whether ONNX Runtime has a real kernel there for each weight type.

ONNX Runtime's MatMulNBits (what every s8/s4 graph runs on), from its sources and wheels and
checked here where this machine can show it (tests/test_cpu.py):
- 4-bit: kernels at every accuracy level, x86-64 (AVX2, AVX-512) and aarch64 (NEON; the
  int8-activation path of accuracy level 4 needs dotprod: without it ONNX Runtime runs its fp32
  NEON kernel, which unpacks the 4-bit blocks as it goes -- no per-call dequantization, but under
  emulation a Cortex-A53 took the same instructions per token at levels 1 and 4, 15 times an
  A55's s8; benchmarks/arm/check.sh).
- 8-bit: kernels only with accuracy level 4 (on x86-64 too: ORT 1.32 falls back at levels
  0-3); on aarch64 only from 1.23 on and only on CPUs with dotprod (`asimddp`: Cortex-A55, A76
  and later; not A53, A72). Otherwise the op dequantizes the whole weight on every call
  ("Falling back to using unpacked compute mode", an INFO log line): under emulation an s8
  Cortex-A53 decode took 60 times the instructions of an A55's. Before 1.23 it refuses 8-bit on
  aarch64. So on aarch64 without dotprod (or before 1.23) the engine re-lays 8-bit weights at
  load for ORT's integer GEMM, which has plain NEON kernels (edgellm.onnx.qgemm): 61 M
  instructions per token on the emulated A53 instead of 1,776 M.

Where both paths exist, which one runs is measured, not predicted (runtime.kernels).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

# /proc/cpuinfo "CPU part" of ARM's cores
ARM_PARTS = {0xd03: "cortex-a53", 0xd04: "cortex-a35", 0xd05: "cortex-a55",
             0xd07: "cortex-a57", 0xd08: "cortex-a72", 0xd09: "cortex-a73",
             0xd0a: "cortex-a75", 0xd0b: "cortex-a76", 0xd0c: "neoverse-n1",
             0xd0d: "cortex-a77", 0xd41: "cortex-a78", 0xd42: "cortex-a78ae",
             0xd44: "cortex-x1", 0xd46: "cortex-a510", 0xd47: "cortex-a710",
             0xd4b: "cortex-a78c"}
# what the boards' cores have (for `plan`, which cannot read the board's /proc/cpuinfo)
CORE_FEATURES = {"cortex-a53": set(), "cortex-a72": set(), "cortex-a55": {"asimddp"},
                 "cortex-a76": {"asimddp"}, "cortex-a78ae": {"asimddp"}}


@dataclass(frozen=True)
class Cpu:
    arch: str  # "aarch64" or "x86_64" (or what platform.machine() says)
    name: str  # "cortex-a55", or the x86 model name
    features: frozenset[str]

    @property
    def dotprod(self) -> bool:
        return "asimddp" in self.features

    @classmethod
    def core(cls, name: str) -> "Cpu":
        """A known ARM core, as a board's preset names it."""
        return cls("aarch64", name, frozenset(CORE_FEATURES[name]))


def read_cpu(cpuinfo: str | None = None, machine: str | None = None) -> Cpu:
    """This machine's CPU, from /proc/cpuinfo (or the text given)."""
    machine = (machine or platform.machine()).lower()
    arch = "aarch64" if machine in ("aarch64", "arm64") else machine
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    if arch == "aarch64":
        features = frozenset(fields.get("features", "").split())
        try:
            name = ARM_PARTS.get(int(fields.get("cpu part", ""), 16), fields["cpu part"])
        except (KeyError, ValueError):
            name = "unknown arm core"
        return Cpu(arch, name, features)
    return Cpu(arch, fields.get("model name", machine), frozenset(fields.get("flags", "").split()))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def matmul_path(cpu: Cpu, bits: int, accuracy_level: int, ort_version: str) -> tuple[str, str]:
    """("kernel" | "qgemm" | "dequantize", why) for MatMulNBits of `bits` on `cpu`; "qgemm":
    the engine re-lays the weights at load for ORT's integer GEMM (edgellm.onnx.qgemm)."""
    arm = cpu.arch == "aarch64"
    if bits == 4:
        fp32 = arm and not cpu.dotprod
        return "kernel", "4-bit kernels" + (" (no dotprod: the fp32 NEON kernel)" if fp32
                                            else "")
    if arm and (not cpu.dotprod or _version(ort_version) < (1, 23)):
        lacks = (f"the {cpu.name} has no dotprod" if not cpu.dotprod else
                 f"onnxruntime {ort_version} has no 8-bit MatMulNBits for aarch64")
        return "qgemm", f"8-bit on ONNX Runtime's integer GEMM, re-laid at load ({lacks})"
    if accuracy_level != 4:
        return "dequantize", f"8-bit kernels need accuracy level 4 (the graphs have " \
                             f"{accuracy_level})"
    return "kernel", "8-bit kernels" + (" (dotprod)" if arm else "")


RUNS_WELL = ("kernel", "qgemm")


def without_kernel(cpu: Cpu, schemes: list[dict], accuracy_level: int,
                   ort_version: str) -> list[str]:
    """Why ONNX Runtime would not run these schemes' integer weights with a kernel on `cpu`
    (empty: it would)."""
    return [why for s in schemes if s.get("kind") == "int"
            for path, why in [matmul_path(cpu, s["bits"], accuracy_level, ort_version)]
            if path not in RUNS_WELL]


def _graph_paths(manifest, cpu: Cpu, ort_version: str) -> list[tuple[str, str, str, str]]:
    """(part, graph file, path, why) for every graph of an artifact: its layers as "layer i",
    the post graph as "lm_head" (matmul_path of each one's weight scheme)."""
    if not manifest.graphs:
        return []
    level = manifest.graphs.get("accuracy_level", 4)
    graphs = [(f"layer {i}", graph, manifest.layer_schemes.get(layer) or manifest.weight_scheme)
              for i, (graph, layer) in enumerate(zip(manifest.graphs["layers"],
                                                     manifest.layers))]
    graphs.append(("lm_head", manifest.graphs["post"], manifest.post_scheme))
    return [(part, graph, *matmul_path(cpu, scheme.get("bits", 16), level, ort_version))
            for part, graph, scheme in graphs]


def slow_parts(manifest, cpu: Cpu, ort_version: str) -> list[str]:
    """The graphs of an artifact that ONNX Runtime would not run with a kernel on `cpu`, each
    with the reason."""
    slow = {}
    for part, _, path, why in _graph_paths(manifest, cpu, ort_version):
        if path not in RUNS_WELL:
            slow.setdefault(why, []).append(part)
    return [f"{_parts(parts)}: {why}" for why, parts in slow.items()]


def _parts(parts: list[str]) -> str:
    layers = [p for p in parts if p.startswith("layer")]
    named = [p for p in parts if not p.startswith("layer")]
    if len(layers) > 2:
        layers = [f"{len(layers)} layers"]
    return ", ".join(layers + named)
