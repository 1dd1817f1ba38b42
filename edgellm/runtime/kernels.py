"""Which ONNX Runtime path runs an artifact's integer weights on this CPU: measured, not predicted.

Two paths read the same 8-bit (or 4-bit) weights:
- "matmulnbits": the graphs as built (MatMulNBits, accuracy level 4: int8 activations per block
  inside the op). Where ONNX Runtime has no 8-bit kernel for the CPU (aarch64 without dotprod,
  runtime.cpu) it is not a candidate.
- "qgemm": the weights re-laid at load for ONNX Runtime's integer GEMM, MatMulInteger / MLAS
  QGEMM (edgellm.onnx.qgemm), with int8 weights where this CPU's u8 x s8 kernel is exact and
  uint8 ones where it saturates (x86 without VNNI: `u8s8_exact` probes it). 4-bit weights are
  re-laid as int8 too: twice their bytes, so only where memory holds them (ort_engine).

Which is faster is a property of the core, not of its feature flags (issue 29: on an AVX2-only
Zen 1, one 896 -> 4864 op at 128 rows took 38 ms on MatMulNBits and 16 ms on QGEMM; on a Zen 4
with VNNI MatMulNBits is the faster one at one row). So at the first load of a layout on a CPU
both run the artifact's own first layers, in turns, for one row (a decode step), a few rows (a
verify of drafted tokens, a batched step) and a prefill chunk; the one that is no slower at any
of them by more than the noise and faster at one is kept, else the default (MatMulNBits where it
exists). The choice is cached per CPU, its flags, the thread count, ONNX Runtime's version and the
artifact's layout under cache_dir()/kernels/; an entry that does not parse or was made for
anything else is measured again, never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeLLMError

PATHS = ("matmulnbits", "qgemm")
CHOICES = ("auto", "mixed", *PATHS)  # --kernel
CACHE_VERSION = 3  # 2: the post graph timed where no layer is 8-bit; 3: 4-bit re-laid too
NOISE = 0.03  # a path must be this much faster somewhere, and no slower anywhere, to be chosen
LAYERS_TIMED = 4  # the artifact's first layers, each with weights of its own (not all in cache)


@dataclass
class Choice:
    path: str  # one of PATHS
    why: str  # one line: measured (with the figures), forced, or the only path
    weights: str = "s8"  # QGEMM's weight type: "s8", or "u8" where u8 x s8 saturates
    measured: dict = field(default_factory=dict)  # path -> {rows: ms}
    # the other path for forwards of at least prefill_rows rows (prompt chunks), where it was
    # measured faster there and memory allows both (OrtEngine decides the memory)
    prefill_path: str | None = None
    prefill_rows: int = 0
    timed: str = "layers"  # what was measured: "layers", or "post" (only the lm_head is 8-bit)
    cached: bool = False

    def label(self) -> str:
        """The path(s), e.g. "matmulnbits, qgemm from 16 rows"."""
        if self.prefill_path:
            return f"{self.path}, {self.prefill_path} from {self.prefill_rows} rows"
        return self.path

    def line(self) -> str:
        return f"{self.label()} ({self.why}{', cached' if self.cached else ''})"

    def without_prefill_path(self, reason: str) -> "Choice":
        return replace(self, prefill_path=None, prefill_rows=0, why=f"{self.why}; {reason}")


@functools.lru_cache(maxsize=None)
def u8s8_exact() -> bool:
    """Whether ONNX Runtime's u8 x s8 integer GEMM is exact on this CPU: the worst case (255
    times 127, pairs that overflow a 16-bit lane) on 1 and 16 rows against numpy. (Call it
    once ort_engine has made the process-wide thread pool.)"""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = 64, 32
    w = np.full((k, n), 127, np.int8)
    w[1::4] = -128
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "za"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.uint8(128), "za")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.use_per_session_threads = False  # the engine's process-wide pool (ort_engine)
    session = ort.InferenceSession(model.SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    for rows in (1, 16):
        a = np.full((rows, k), 255, np.uint8)
        a[:, 2::5] = 0
        want = (a.astype(np.int64) - 128) @ w.astype(np.int64)
        if not np.array_equal(session.run(None, {"a": a})[0], want):
            return False
    return True


def qgemm_weights() -> str:
    return "s8" if u8s8_exact() else "u8"


def int_schemes(manifest) -> list[dict]:
    """The artifact's integer weight schemes (what the QGEMM re-layout takes: 4 or 8 bits)."""
    schemes = [manifest.weight_scheme, manifest.post_scheme, *manifest.layer_schemes.values()]
    return [s for s in schemes if is_int(s)]


def candidates(manifest, cpu, ort_version: str) -> dict[str, str]:
    """The paths this artifact's weights allow on `cpu`: name -> why it is (or is not) one;
    a path whose why starts with "no:" is not available."""
    from edgellm.runtime.cpu import matmul_path

    schemes = int_schemes(manifest) if manifest.graphs else []
    if not schemes:
        return {"matmulnbits": "float weights: MatMulNBits is the only path",
                "qgemm": "no: it re-lays integer weights, and this artifact has none"}
    level = manifest.graphs.get("accuracy_level", 4)
    paths = {bits: matmul_path(cpu, bits, level, ort_version)
             for bits in sorted({s["bits"] for s in schemes}, reverse=True)}
    lacking = [why for path, why in paths.values() if path != "kernel"]
    return {"matmulnbits": f"no: {lacking[0]}" if lacking else "; ".join(
                why for _, why in paths.values()),
            "qgemm": "integer weights re-laid for the integer GEMM"}


def layout_key(manifest) -> str:
    """What the timings depend on in an artifact: shapes, schemes, graphs, prefill chunk."""
    graph = manifest.graphs["layers"][0] if manifest.graphs else ""
    layout = {"config": manifest.config, "weight": manifest.weight_scheme,
              "post": manifest.post_scheme, "layer_schemes": manifest.layer_schemes,
              "graphs": manifest.graphs, "prefill_len": manifest.prefill_len,
              "kv_cache_len": manifest.kv_cache_len,
              "graph_sha256": manifest.files.get(graph, {}).get("sha256", "")}
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:20]


def cache_key(manifest, cpu, ort_version: str, threads: int) -> dict:
    return {"version": CACHE_VERSION, "cpu": cpu.name,
            "features": hashlib.sha256(" ".join(sorted(cpu.features)).encode()).hexdigest()[:16],
            "arch": cpu.arch, "onnxruntime": ort_version, "threads": threads,
            "layout": layout_key(manifest)}


def _cache_file(key: dict) -> Path:
    from edgellm.fileutil import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "kernels" / f"{digest}.json"


def read_cached(key: dict, allowed: set[str]) -> Choice | None:
    """The choice cached for `key`, or None: none, damaged, made for another key, or naming a
    path not allowed here."""
    try:
        entry = json.loads(_cache_file(key).read_text())
        if entry["key"] != key or entry["choice"]["path"] not in allowed:
            return None
        c = entry["choice"]
        choice = Choice(str(c["path"]), str(c["why"]), str(c["weights"]), dict(c["measured"]),
                        c["prefill_path"], int(c["prefill_rows"]), str(c["timed"]),
                        cached=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    ok = choice.weights in ("s8", "u8") and choice.timed in ("layers", "post") and (
        choice.prefill_path is None or (choice.prefill_path in allowed and choice.prefill_rows > 1
                                        and choice.prefill_path != choice.path))
    return choice if ok else None


def write_cached(key: dict, choice: Choice) -> None:
    """Written whole or not at all (a temporary file renamed over the entry)."""
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        entry = {"key": key, "choice": {k: v for k, v in asdict(choice).items() if k != "cached"},
                 "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp.write_text(json.dumps(entry, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: measured again next time, nothing else lost


def decide(measured: dict[str, dict], default: str) -> tuple[str, str | None, int, str]:
    """(path, prefill path or None, its first row count, why) from {path: {rows: ms}}: another
    path than `default` only where it is no slower at any row count by more than NOISE and
    faster at one by more than NOISE; then, for prompt chunks, a path faster than that one by
    more than NOISE from some row count on (at that count and every larger one measured)."""
    base = measured[default]
    best = default
    for path, times in measured.items():
        if path == default:
            continue
        ratios = [times[r] / base[r] for r in base]
        if max(ratios) <= 1 + NOISE and min(ratios) < 1 - NOISE:
            if best == default or sum(times.values()) < sum(measured[best].values()):
                best = path
    prefill, first = prompt_path(measured, best)
    counts = sorted(base, key=int)
    figures = "; ".join(
        f"{rows} row{'s' if int(rows) > 1 else ''}: " + ", ".join(
            f"{p} {measured[p][rows]:.2f} ms" for p in measured) for rows in counts)
    return best, prefill, first, f"measured on this CPU, {figures}"


def prompt_path(measured: dict[str, dict], best: str) -> tuple[str | None, int]:
    """(the path faster than `best` by more than NOISE from some row count on, at that count
    and every larger one measured; that first count), or (None, 0)."""
    prefill, first = None, 0
    counts = sorted(measured[best], key=int)
    for path, times in measured.items():
        if path == best:
            continue
        faster = [times[r] < measured[best][r] * (1 - NOISE) for r in counts]
        for i in range(1, len(counts)):
            if all(faster[i:]) and (first == 0 or int(counts[i]) < first):
                prefill, first = path, int(counts[i])
                break
    return prefill, first


# how much slower MatMulNBits' one-row layers may time and still decode under `mixed`: the
# first layers' one-row times overstate QGEMM's lead in a whole decode step (AVX2-only Zen 3,
# Qwen2.5-Coder-0.5B s8: layers 9.65 ms QGEMM against 10.49 ms, 8%, while `bench` decoded at
# 34.1 tok/s on either path)
DECODE_BAND = 0.10


def decode_rounding_less(choice: Choice) -> Choice:
    """`--kernel mixed` where the measurement chose QGEMM though MatMulNBits decodes as fast
    (within DECODE_BAND at one row): decode on MatMulNBits, whose rounding is the smaller (QGEMM
    quantizes each activation row with one scale: Qwen2.5-Coder-0.5B s8's KL to the source
    0.0158 against 0.0026, decoded token by token on the AVX2-only Zen 3, where the two paths'
    one-row times tie), and prompt chunks on QGEMM from where it is faster (that split: KL
    0.0065, benchmarks/experiments/decode_quality.py)."""
    m = choice.measured
    if choice.path == "matmulnbits" or choice.timed != "layers" or \
            "matmulnbits" not in m or choice.path not in m:
        return choice
    if m["matmulnbits"]["1"] > m[choice.path]["1"] * (1 + DECODE_BAND):
        return choice  # the other path decodes faster: it stays
    prefill, rows = prompt_path(m, "matmulnbits")
    if prefill is None:
        return choice
    return replace(choice, path="matmulnbits", prefill_path=prefill, prefill_rows=rows,
                   why=f"{choice.why}; matmulnbits decodes as fast here and rounds less")


def row_counts(prefill_len: int) -> list[int]:
    """A decode step, a verify of drafted tokens (or a batched step), more, a prompt chunk."""
    return sorted({1, min(4, prefill_len), min(16, prefill_len), prefill_len})


def is_int(scheme: dict) -> bool:
    """Integer weights the QGEMM re-layout takes (8 or 4 bits)."""
    return scheme.get("kind") == "int" and scheme.get("bits") in (4, 8)


def timed_graphs(manifest) -> tuple[list[str], bool]:
    """(graph files, whether they are layers): the first LAYERS_TIMED layers with integer
    weights, or, where no layer has any (float layers with an s8 lm_head), the post graph, the
    only one whose path differs."""
    layers = [g for g, layer in zip(manifest.graphs["layers"], manifest.layers)
              if is_int(manifest.layer_schemes.get(layer) or manifest.weight_scheme)]
    if layers:
        return layers[:LAYERS_TIMED], True
    return [manifest.graphs["post"]], False


def measure(artifact, paths: list[str], weights: str, make_session,
            turns: int = 5) -> dict[str, dict]:
    """{path: {rows: ms}}: the artifact's first integer layers (or its post graph) on each path,
    for each row count, in turns (a slow moment of a shared host falls on every path alike);
    the median per path. The post graph is timed for 1 and 4 rows: the engine runs it on a
    prompt's last row only, and on a verify's few."""
    import onnxruntime as ort

    m = artifact.manifest
    cfg = artifact.config
    names, layers = timed_graphs(m)
    sessions = {p: [make_session(name, p == "qgemm", weights) for name in names] for p in paths}
    kv = (1, cfg.num_kv_heads, m.kv_cache_len, cfg.head_dim)
    key, value = np.zeros(kv, np.float32), np.zeros(kv, np.float32)
    rng = np.random.default_rng(0)
    ov = ort.OrtValue.ortvalue_from_numpy
    counts = row_counts(m.prefill_len) if layers else sorted({1, min(4, m.prefill_len)})
    times: dict[str, dict[int, list[float]]] = {p: {r: [] for r in counts} for p in paths}
    runs = {}
    for rows in counts:
        hidden = (rng.standard_normal((1, rows, cfg.hidden_size)) * 0.5).astype(np.float32)
        if layers:
            out = {"hidden_out": np.empty_like(hidden)}
            inputs = {"hidden": ov(hidden), "past_key": ov(key), "past_value": ov(value),
                      "seqlens_k": ov(np.array([rows - 1], np.int32)),
                      "total_seq_len": ov(np.array(rows, np.int32))}
        else:
            out = {"logits": np.empty((1, rows, cfg.vocab_size), np.float32)}
            inputs = {"hidden": ov(hidden)}
        for p in paths:
            bindings = []
            for s in sessions[p]:
                b = s.io_binding()
                for name, v in inputs.items():
                    b.bind_ortvalue_input(name, v)
                for name, v in out.items():
                    b.bind_ortvalue_output(name, ov(v))
                if layers:
                    b.bind_ortvalue_output("present_key", inputs["past_key"])
                    b.bind_ortvalue_output("present_value", inputs["past_value"])
                bindings.append((s, b))
            runs[p, rows] = bindings
    repeat = {r: max(1, 16 // r) for r in counts}  # short runs repeated, so a timer tick is small
    for turn in range(turns + 1):
        for rows in counts:
            for p in paths:
                t = time.perf_counter()
                for _ in range(repeat[rows]):
                    for s, b in runs[p, rows]:
                        s.run_with_iobinding(b)
                if turn:  # the first turn warms up
                    times[p][rows].append((time.perf_counter() - t) / repeat[rows] * 1000)
    return {p: {str(r): statistics.median(v) for r, v in times[p].items()} for p in paths}


def choose(artifact, cpu, ort_version: str, threads: int, make_session,
           kernel: str = "auto") -> Choice:
    """The path for this artifact on this CPU: `kernel` forced, the only one there is, the
    cached choice, or measured now (and cached); make_session(graph name, qgemm, weights)
    makes a layer's session for the measurement. "auto" keeps one path; "mixed" adds the
    measured prefill path (prompt chunks on the integer GEMM where that is faster there: it
    loads the layers' weights twice, and the QGEMM re-layout rounds differently: Qwen2.5-Coder-
    0.5B s8 perplexity +0.3% against MatMulNBits, and SmolLM2-135M's near tie on "the capital
    of France" flipped)."""
    allowed = candidates(artifact.manifest, cpu, ort_version)
    usable = [p for p in PATHS if not allowed[p].startswith("no:")]
    weights = qgemm_weights() if "qgemm" in usable else "s8"
    u8 = ", uint8 weights: this CPU's u8 x s8 kernel saturates" if weights == "u8" else ""
    if kernel not in ("auto", "mixed"):
        if kernel not in PATHS:
            raise EdgeLLMError(f"--kernel {kernel}: no such path ({', '.join(CHOICES)})")
        if kernel not in usable:
            raise EdgeLLMError(f"--kernel {kernel} is not available for {artifact.path} on this "
                               f"CPU ({cpu.name}): {allowed[kernel][4:]}; available: "
                               f"{', '.join(usable)}")
        return Choice(kernel, f"--kernel {kernel}" + (u8 if kernel == "qgemm" else ""),
                      weights)
    if len(usable) == 1:
        only = usable[0]
        return Choice(only, allowed[only] + (u8 if only == "qgemm" else ""), weights)
    key = cache_key(artifact.manifest, cpu, ort_version, threads)
    choice = read_cached(key, set(usable))
    if choice is None:
        try:
            measured = measure(artifact, usable, weights, make_session)
        except Exception as e:  # noqa: BLE001 -- ORT's own types; never worse than before
            print(f"edgellm: warning: timing the kernel paths failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); using MatMulNBits",
                  file=sys.stderr)
            return Choice("matmulnbits", "the default: timing the paths failed", weights)
        path, prefill, rows, why = decide(measured, "matmulnbits")
        timed = "layers" if timed_graphs(artifact.manifest)[1] else "post"
        if timed == "post":  # only the lm_head differs: prompts run it on their last row
            prefill, rows, why = None, 0, why.replace("measured on this CPU",
                                                      "the lm_head measured on this CPU")
        choice = Choice(path, why + (u8 if "qgemm" in (path, prefill) else ""), weights,
                        measured, prefill, rows, timed)
        write_cached(key, choice)
    if kernel == "mixed":
        return decode_rounding_less(choice)
    if choice.prefill_path:
        return choice.without_prefill_path(f"{choice.prefill_path} is faster from "
                                           f"{choice.prefill_rows} rows: --kernel mixed")
    if decode_rounding_less(choice) is not choice:
        return replace(choice, why=f"{choice.why}; matmulnbits decodes as fast here and rounds "
                                   f"less: --kernel mixed")
    return choice


def here(artifact, threads: int) -> str:
    """One line for `inspect`: the cached choice for this CPU, or what the first load does."""
    import onnxruntime as ort

    from edgellm.runtime.cpu import read_cpu

    cpu = read_cpu()
    allowed = candidates(artifact.manifest, cpu, ort.__version__)
    usable = [p for p in PATHS if not allowed[p].startswith("no:")]
    if len(usable) == 1:
        return f"{usable[0]} ({allowed[usable[0]]})"
    cached = read_cached(cache_key(artifact.manifest, cpu, ort.__version__, threads),
                         set(usable))
    if cached is not None and cached.prefill_path:  # what auto runs (runtime.kernels.choose)
        cached = cached.without_prefill_path(f"{cached.prefill_path} is faster from "
                                             f"{cached.prefill_rows} rows: --kernel mixed")
    if cached is not None:
        return cached.line()
    return (f"not measured on this CPU yet ({' or '.join(usable)}: the first load with "
            f"{threads} threads times both, about a second, and keeps the faster)")
