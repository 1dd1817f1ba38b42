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


def busy_share(seconds: float = 0.5) -> float | None:
    """The share of this process's CPUs that other work kept busy over `seconds` (/proc/stat;
    None where it cannot be read). Call it before this process starts its own work."""
    import time

    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def read() -> tuple[int, int]:
        busy = total = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    continue
                if allowed is not None and int(name[3:]) not in allowed:
                    continue
                ticks = [int(x) for x in fields[:8]]
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
        return busy, total

    try:
        b0, t0 = read()
        time.sleep(seconds)
        b1, t1 = read()
    except (OSError, ValueError):
        return None
    return (b1 - b0) / (t1 - t0) if t1 > t0 else None


def warn_if_busy(threads: int | None, what: str) -> None:
    """One warning line when other work keeps a quarter or more of the CPUs busy: `threads`
    threads (default one per core) would wait for it, and fewer are often faster (measured on a
    shared 2-core host: 12.8 tok/s with 2 threads, 23.2 with 1)."""
    import sys

    share = busy_share()
    if share is not None and share >= 0.25:
        print(f"edgellm: warning: other work keeps {share:.0%} of the CPUs busy: {what} with "
              f"{threads or 'one thread per core'}{' threads' if threads else ''} will share them "
              f"(fewer --threads may be faster here)", file=sys.stderr, flush=True)


_TRIM: list = []  # [the C library's malloc_trim, or None where there is none]


def give_back_freed_memory() -> None:
    """Hand the pages the C heap holds freed back to the system (glibc's malloc_trim): ONNX
    Runtime's transients at load (weight packing) and a prompt's activations stay in the
    process otherwise (benchmarks/experiments/memory_trim.py; docs/PERFORMANCE.md, "A lighter
    KV cache": up to 574 MB less resident after loading the 1.5B); 10-16 ms a call. No-op
    without glibc."""
    if not _TRIM:
        import ctypes

        try:
            _TRIM.append(ctypes.CDLL(None).malloc_trim)
        except (AttributeError, OSError):
            _TRIM.append(None)
    if _TRIM[0] is not None:
        _TRIM[0](0)
