"""What this machine has, for the compiler's and the runtime's memory checks alike."""

from __future__ import annotations

import os


def machine_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM: /proc/meminfo on Linux, sysconf elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"], info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


_TRIM: list = []  # [the C library's malloc_trim, or None where there is none]


def give_back_freed_memory() -> None:
    """Hand the pages the C heap holds freed back to the system (glibc's malloc_trim): ONNX
    Runtime's transients at load (weight packing) and a prompt's activations stay in the
    process otherwise. Measured on Qwen2.5-Coder-1.5B s8 (Zen 4): 294 MB less resident after
    load, 100-170 MB after a 4,000-token prompt; 10-16 ms a call. No-op without glibc."""
    if not _TRIM:
        import ctypes

        try:
            _TRIM.append(ctypes.CDLL(None).malloc_trim)
        except (AttributeError, OSError):
            _TRIM.append(None)
    if _TRIM[0] is not None:
        _TRIM[0](0)
