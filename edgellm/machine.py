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
