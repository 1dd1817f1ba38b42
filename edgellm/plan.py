"""`edgellm plan`: will this model fit a device, and how fast can it decode there, per weight type.

Decode is memory-bound: each token reads every layer and lm_head weight once, so the ceiling is
bandwidth / bytes per token. Memory is the weights as stored, the KV cache (fp32, as this runtime
keeps it) and about 150 MB of runtime; the bf16 embedding table is mapped, only its used rows
paged in (counted separately as disk).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgellm.build.memory import RUNTIME_OVERHEAD, footprint
from edgellm.errors import EdgeLLMError
from edgellm.quant.schemes import get_scheme


@dataclass(frozen=True)
class Board:
    ram: float  # bytes, the common variant
    bandwidth: float  # bytes/s: peak = bus width x transfer rate of the published memory spec
    note: str


BOARDS = {
    "rpi4": Board(4e9, 12.8e9, "Raspberry Pi 4: LPDDR4-3200, 32-bit bus (1-8 GB)"),
    "rpi5": Board(4e9, 17.1e9, "Raspberry Pi 5: LPDDR4X-4267, 32-bit bus (2-16 GB)"),
    "rk3588": Board(8e9, 34.1e9, "RK3588 boards (Orange Pi 5, Rock 5B): LPDDR4X-4266, 64-bit "
                                 "bus (4-32 GB)"),
    "orin-nano": Board(8e9, 68e9, "Jetson Orin Nano 8GB: LPDDR5, 128-bit, 68 GB/s published"),
}
# (label, weight type, post weight type, group size)
VARIANTS = [("bf16", "bf16", "bf16", 128), ("s8", "s8", "s8", 128),
            ("s4 g128, s8 lm_head", "s4", "s8", 128), ("s4 g128", "s4", "s4", 128),
            ("s4 g32", "s4", "s4", 32)]
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_size(text: str, what: str) -> float:
    """'2GB', '17GB/s', '512M', '1.5g' -> bytes (or bytes/s)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?(/s)?\s*", text.lower())
    if not m:
        raise EdgeLLMError(f"{what} {text!r} is not a size like 2GB or 17GB/s")
    return float(m.group(1)) * _UNITS[m.group(2)]


def plan(cfg, kv_cache_len: int, ram: float, bandwidth: float) -> list[dict]:
    rows = []
    for label, weights, post, group in VARIANTS:
        need = footprint(cfg, get_scheme(weights, group), get_scheme(post, group), kv_cache_len)
        per_token = need.layer_weights + need.post_weights
        rows.append({"weights": label, "weights_gb": per_token / 1e9,
                     "kv_cache_gb": need.kv_cache / 1e9, "runtime_gb": need.runtime / 1e9,
                     "embedding_gb": need.embedding / 1e9, "fits": need.runtime <= ram,
                     "decode_ceiling_tok_s": bandwidth / per_token})
    return rows


def table(rows: list[dict], ram: float, bandwidth: float, kv_cache_len: int) -> str:
    lines = [f"device: {ram / 1e9:.1f} GB RAM, {bandwidth / 1e9:.1f} GB/s; KV cache "
             f"{kv_cache_len} positions; runtime overhead {RUNTIME_OVERHEAD / 1e9:.2f} GB",
             "",
             "| weights | weights read per token | KV cache | RAM needed | fits | "
             "decode ceiling |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weights']} | {r['weights_gb']:.2f} GB | {r['kv_cache_gb']:.2f} GB | "
                     f"{r['runtime_gb']:.2f} GB | {'yes' if r['fits'] else 'no'} | "
                     f"{r['decode_ceiling_tok_s']:.1f} tok/s |")
    lines += ["", f"(+ {rows[0]['embedding_gb']:.2f} GB bf16 embedding table on disk, mapped)"]
    return "\n".join(lines)
