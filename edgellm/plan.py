"""`edgellm plan`: will this model fit a device, and how fast can it decode there, per weight type.

Decode is memory-bound: each token reads every layer and lm_head weight once, so the ceiling is
bandwidth / bytes per token. Memory is the weights as stored, the KV cache (fp32, as this runtime
keeps it) and about 150 MB of runtime; the bf16 embedding table is mapped, only its used rows
paged in (counted separately as disk).
"""

from __future__ import annotations

import re
from dataclasses import replace

from edgellm.artifact.inspect import layout_label
from edgellm.boards import BOARDS, Board  # noqa: F401  (plan.BOARDS: the CLI's presets)
from edgellm.compiler.memory import RUNTIME_OVERHEAD, footprint
from edgellm.errors import EdgeLLMError
from edgellm.onnx.graphs import supports
from edgellm.quant.schemes import layout_schemes


# (weight type, post weight type, group size, symmetric): the layouts compared; the artifact's
# own is marked, or added when it is none of these
VARIANTS = [("bf16", "bf16", 128, True), ("s8", "s8", 128, True), ("s4", "s8", 32, False),
            ("s4", "s8", 64, False), ("s4", "s4", 32, False), ("s4", "s4", 32, True),
            ("s4", "s8", 128, True), ("s4", "s4", 128, True)]
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_LIMITS = {False: (64e6, 16e12, "B"), True: (0.1e9, 10e12, "B/s")}  # plausible devices


def parse_size(text: str, what: str, per_second: bool = False) -> float:
    """'2GB', '512MB', '2GiB', '17GB/s' -> bytes (or bytes/s); a bare number is GB (GB/s)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt]?)(i?)b)?\s*(/s)?\s*", text.lower())
    example = "17GB/s" if per_second else "2GB"
    if not m or (m.group(4) and not per_second):
        raise EdgeLLMError(f"{what} {text!r} is not a size like {example}")
    value, prefix, binary = float(m.group(1)), m.group(2), m.group(3)
    if m.group(2) is None:  # a bare number: GB, unless it looks like MB
        if value >= 1024:
            raise EdgeLLMError(f"{what} {text!r} has no unit and would be {value:g} G"
                               f"{_LIMITS[per_second][2]}; write e.g. {text.strip()}M"
                               f"{_LIMITS[per_second][2]} or {example}")
        prefix = "g"
    size = value * (1024 ** ("kmgt".index(prefix) + 1) if binary and prefix else _UNITS[prefix])
    low, high, unit = _LIMITS[per_second]
    if not low <= size <= high:
        raise EdgeLLMError(f"{what} {text!r} reads as {size / 1e9:g} G{unit}, which no device "
                           f"has; give a unit, e.g. {example}")
    return size


def _row(label: str, per_token: int, need, ram: float, bandwidth: float, own: bool,
         kernel: str) -> dict:
    return {"weights": label, "weights_gb": per_token / 1e9,
            "kv_cache_gb": need.kv_cache / 1e9, "runtime_gb": need.runtime / 1e9,
            "embedding_gb": need.embedding / 1e9, "fits": need.runtime <= ram,
            "decode_ceiling_tok_s": bandwidth / per_token, "this_artifact": own,
            "kernel": kernel}


def _kernel(cpu, schemes: list[dict], ort_version: str) -> str:
    """'yes', or why ONNX Runtime would dequantize per token on `cpu` (runtime.cpu)."""
    from edgellm.runtime.cpu import matmul_path, without_kernel

    if not all(s.get("kind") == "int" for s in schemes):
        return "numpy engine"
    if not cpu:
        return "yes"
    slow = without_kernel(cpu, schemes, 4, ort_version)
    if slow:
        return f"no ({slow[0]})"
    relaid = any(matmul_path(cpu, s["bits"], 4, ort_version)[0] == "qgemm" for s in schemes)
    if relaid and any(s["bits"] == 4 for s in schemes):  # runtime.ort_engine._with_memory
        return "yes (on QGEMM, re-laid at load; the 4-bit weights as int8 where memory holds " \
               "twice their bytes)"
    return "yes (8-bit on QGEMM, re-laid at load)" if relaid else "yes"


def plan(cfg, kv_cache_len: int, ram: float, bandwidth: float, artifact=None, cpu=None,
         ort_version: str = "1.32", parallel: int = 1, cache_type: str = "fp32") -> list[dict]:
    """One row per layout in VARIANTS; the artifact's own layout (from its manifest, its bytes
    as written) is marked, or added first when it is not among them."""
    own = None
    if artifact is not None:
        m = artifact.manifest
        own = (layout_label(m.weight_scheme, m.post_scheme, bool(m.layer_schemes)),
               sum(m.files[f]["size"] for f in [*m.layers, m.post]))
    def held(scheme: dict) -> str:  # a layout the numpy engine runs keeps an fp32 cache
        return cache_type if supports(scheme) else "fp32"

    rows = []
    for weights, post, group, symmetric in VARIANTS:
        scheme, post_scheme = layout_schemes(weights, (post,), group, symmetric)
        need = footprint(cfg, scheme, post_scheme, kv_cache_len,
                         cache_type=held(scheme.to_dict()))
        need = replace(need, kv_cache=need.kv_cache * parallel)  # one cache per request
        label = layout_label(scheme.to_dict(), post_scheme.to_dict())
        kernel = _kernel(cpu, [scheme.to_dict(), post_scheme.to_dict()], ort_version)
        rows.append(_row(label, need.layer_weights + need.post_weights, need, ram, bandwidth,
                         own is not None and own[0] == label, kernel))
    if own and not any(r["this_artifact"] for r in rows):
        need = footprint(cfg, artifact.weight_scheme, artifact.post_scheme, kv_cache_len,
                         cache_type=held(artifact.manifest.weight_scheme))
        need = replace(need, layer_weights=own[1], post_weights=0,
                       kv_cache=need.kv_cache * parallel)
        m = artifact.manifest
        kernel = _kernel(cpu, [m.weight_scheme, m.post_scheme, *m.layer_schemes.values()],
                         ort_version)
        rows.insert(0, _row(own[0], own[1], need, ram, bandwidth, True, kernel))
    return rows


def table(rows: list[dict], ram: float, bandwidth: float, kv_cache_len: int,
          parallel: int = 1, cache_type: str = "fp32") -> str:
    caches = (f" x {parallel} (--parallel)" if parallel > 1 else "") + (
        f", {cache_type}" if cache_type != "fp32" else "")
    lines = [f"device: {ram / 1e9:.1f} GB RAM, {bandwidth / 1e9:.1f} GB/s; KV cache "
             f"{kv_cache_len} positions{caches}; runtime overhead {RUNTIME_OVERHEAD / 1e9:.2f} GB",
             "",
             "| weights | weights read per token | KV cache | RAM needed | fits | "
             "decode ceiling | ONNX Runtime kernel |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r['weights']}** (this artifact)" if r["this_artifact"] else r["weights"]
        lines.append(f"| {name} | {r['weights_gb']:.2f} GB | {r['kv_cache_gb']:.2f} GB | "
                     f"{r['runtime_gb']:.2f} GB | {'yes' if r['fits'] else 'no'} | "
                     f"{r['decode_ceiling_tok_s']:.1f} tok/s | {r['kernel']} |")
    lines += ["", f"(+ {rows[0]['embedding_gb']:.2f} GB bf16 embedding table on disk, mapped)"]
    return "\n".join(lines)
