"""Boards edgellm is for: RAM, memory bandwidth (peak = bus width x transfer rate of the published
memory spec, and what a program reaches: measured where a measurement is published, else an
estimate) and the cores the runtime runs on. `plan` reads them; `build --target` chooses for
them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Board:
    ram: float | None  # bytes, the common variant (None: no published figure found)
    bandwidth: float | None  # bytes/s: bus width x transfer rate of the published memory spec
    note: str
    cpu: str  # the cores the runtime runs on (runtime.cpu.CORE_FEATURES)
    sustained: float | None = None  # bytes/s a program was measured to reach, with its source
    sustained_source: str = ""


BOARDS = {
    "rpi3": Board(1e9, 3.6e9, "Raspberry Pi 3 B/B+: LPDDR2-900, 32-bit bus (1 GB), "
                              "4x Cortex-A53", "cortex-a53"),
    "rpi4": Board(4e9, 12.8e9, "Raspberry Pi 4: LPDDR4-3200, 32-bit bus (1-8 GB), "
                               "4x Cortex-A72", "cortex-a72", 5.56e9,
                  "STREAM's best rate on a Pi 4, https://www.sci-pi.org.uk/bench/stream.html"),
    "rpi5": Board(4e9, 17.1e9, "Raspberry Pi 5: LPDDR4X-4267, 32-bit bus (2-16 GB), "
                               "4x Cortex-A76", "cortex-a76"),
    "rk3588": Board(8e9, 34.1e9, "RK3588 boards (Orange Pi 5, Rock 5B): LPDDR4X-4266, 64-bit "
                                 "bus (4-32 GB), 4x Cortex-A76 + 4x A55", "cortex-a76"),
    "orin-nano": Board(8e9, 68e9, "Jetson Orin Nano 8GB: LPDDR5, 128-bit, 68 GB/s published, "
                                  "6x Cortex-A78AE", "cortex-a78ae"),
    # the seed's own boards: their cores are known, their memory specs were not to be found
    # from here, so `plan` asks for --ram and --bandwidth rather than guess them
    "ax650n": Board(None, None, "AXERA AX650N boards: 8x Cortex-A55", "cortex-a55"),
    "ax630c": Board(None, None, "AXERA AX630C boards: Cortex-A53", "cortex-a53"),
}


# what a program reaches of the peak where no measurement is published: the Raspberry Pi 4's
# measured share (5.56 of 12.8 GB/s), rounded down
SUSTAINED_SHARE = 0.4


def sustained(board: Board) -> tuple[float, str]:
    """(bytes/s a decode can count on, where that figure comes from)."""
    peak = f"the {board.bandwidth / 1e9:g} GB/s peak"
    if board.sustained:
        return board.sustained, f"measured ({board.sustained_source}); {peak} is not reached"
    return SUSTAINED_SHARE * board.bandwidth, (
        f"estimated: {SUSTAINED_SHARE:.0%} of {peak}, the share a Raspberry Pi 4 was measured "
        f"to reach; give --bandwidth with a measurement of yours")


def memory_spec(board: Board) -> str:
    if board.ram is None:
        return "no memory spec found: give --ram and --bandwidth"
    return f"{board.ram / 1e9:g} GB, {board.bandwidth / 1e9:g} GB/s"
