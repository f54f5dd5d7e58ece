"""How much memory a device has free, sizes as people write them, and the forward-pass budget.

The forward passes of the behaviour checks and the perplexity gate hold at most a memory
budget (``--merge-memory``): the weights in flight, the adapter, cached layers and activations.
Its default is derived here from the memory the device has available.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

GIB = 1024**3
MIB = 1024**2

#: Units of ``--merge-memory``: decimal (KB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB); a bare
#: K, M, G or T is binary, as ``free -h`` and most tools that print memory mean it.
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*$")

#: The default budget on a CPU: the forward passes' working set (one layer in flight and, room
#: permitting, the next one read ahead, the adapter, activations) plus layers kept between
#: passes, up to this much. More only makes repeated passes faster; less keeps the harness a good
#: neighbour on a shared runner and its memory the same whatever the model size (see
#: docs/forward-passes.md).
DEFAULT_CPU_BUDGET = 2 * GIB
#: Never take more than this share of the available memory by default.
DEFAULT_SHARE = 0.75


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


def parse_size(text: str | int) -> int:
    """``"6GiB"``, ``"6G"``, ``"1.5 GB"``, ``"512MiB"`` or a byte count -> bytes.

    Raises ValueError naming the accepted forms.
    """
    if isinstance(text, bool):
        raise ValueError(f"must be a size such as 6GiB or 512MiB, got {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"must be a positive size, got {text}")
        return text
    found = _SIZE.match(str(text))
    unit = found.group(2).upper() if found else ""
    if found is None or unit not in _UNITS:
        raise ValueError(
            f"must be a size such as 6GiB, 6G, 1.5GB or 512MiB (a bare number is bytes), got"
            f" {text!r}"
        )
    value = int(float(found.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"must be a positive size, got {text!r}")
    return value


def format_size(nbytes: int | float) -> str:
    """Bytes for people: ``1.25 GiB``, ``312 MiB``, ``48 KiB`` or ``512 B``."""
    if abs(nbytes) >= GIB:
        return f"{nbytes / GIB:.2f} GiB"
    if abs(nbytes) >= MIB:
        return f"{nbytes / MIB:.0f} MiB"
    if abs(nbytes) >= 1024:
        return f"{nbytes / 1024:.0f} KiB"
    return f"{int(nbytes)} B"


def suggest_size(nbytes: int | float) -> str:
    """A ``--merge-memory`` value at least ``nbytes``: ``1.3GiB``, ``40MiB``, ``2KiB``."""
    if nbytes >= GIB:
        return f"{math.ceil(nbytes / GIB * 10) / 10:g}GiB"
    if nbytes >= MIB:
        return f"{math.ceil(nbytes / MIB)}MiB"
    return f"{max(1, math.ceil(nbytes / 1024))}KiB"


def default_budget(device: str = "cpu", floor: int = 0) -> int:
    """The forward-pass budget when ``--merge-memory`` is not given.

    On a CPU: ``DEFAULT_CPU_BUDGET``, raised to ``floor`` (the least one streamed pass of the
    model at hand needs: one layer, the adapter, activations) when that is larger, and never more
    than ``DEFAULT_SHARE`` of the available memory. On an accelerator: ``DEFAULT_SHARE`` of its
    free memory (more layers kept there only make passes faster). Unknown availability leaves
    the CPU default.
    """
    free = available_bytes(device)
    if device.split(":")[0] not in ("cpu", "mps"):
        return int(free * DEFAULT_SHARE) if free else DEFAULT_CPU_BUDGET
    wanted = max(DEFAULT_CPU_BUDGET, floor)
    if free is None:
        return wanted
    return max(min(wanted, int(free * DEFAULT_SHARE)), 1)
