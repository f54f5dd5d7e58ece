"""How much memory a device has free, to refuse work that cannot fit before it starts."""

from __future__ import annotations

from pathlib import Path

GIB = 1024**3


def available_bytes(device: str = "cpu", meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes that can still be allocated on ``device``, or None when this cannot be known.

    A CPU's figure is the kernel's ``MemAvailable`` (free memory plus what the page cache can
    give back): the memory a new allocation can take without swapping. A CUDA device's is the
    driver's free memory.
    """
    if device.startswith("cuda"):
        try:
            import torch

            free, _total = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError, ValueError):
            return None
        return int(free)
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            fields = value.split()
            if fields and fields[0].isdigit():
                # the kernel reports kB
                return int(fields[0]) * 1024
    return None


def shortfall(needed: int, device: str = "cpu", what: str = "this") -> str | None:
    """Why ``needed`` bytes do not fit on ``device`` now, or None when they fit or are unknown."""
    free = available_bytes(device)
    if free is None or needed <= free:
        return None
    return (
        f"{what} needs about {needed / GIB:.1f} GiB on {device} but {free / GIB:.1f} GiB is"
        " available"
    )
