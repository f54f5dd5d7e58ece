"""The compute dtype of forward passes: what the CPU at hand runs fastest without losing exactness.

Upcasting bf16 or fp16 weights to float32 is exact, and on most CPUs float32 matmuls are the
fastest there are: without native bf16 instructions half-precision matmuls are emulated (3x
slower than fp32 on an AVX-512 Xeon without AVX512-BF16, 6x on AVX2-only CPUs). CPUs with AMX
or AVX512-BF16 run bf16 matmuls natively, 3-4x faster than fp32, so a bf16 checkpoint is
compared in bf16 there (the stored-dtype rule of ``behaviour.measure``, calibrated separately).
"""

from __future__ import annotations

import functools
from pathlib import Path

#: /proc/cpuinfo flags of native bf16 matrix arithmetic.
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo``, or None where it cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (faster than fp32).

    Read from the CPU flags (AMX or AVX512-BF16); where they cannot be read, measured once: a
    64x2048 @ 2048x2048 matmul in each dtype, best of three.
    """
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & BF16_FLAGS)
    return _bf16_measured_faster()


def _bf16_measured_faster() -> bool:
    import time

    import torch

    def best(dtype: torch.dtype) -> float:
        a = torch.ones(64, 2048, dtype=dtype)
        b = torch.ones(2048, 2048, dtype=dtype)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) < best(torch.float32)


def default_compute(stored: str, device: str) -> str:
    """The comparison dtype when ``--merge-dtype`` is not given.

    An accelerator computes in the stored dtype, as the model is served. A CPU computes a bf16
    checkpoint in bf16 where it has native bf16 (:func:`native_bf16`), in float32 otherwise;
    fp16 checkpoints in float32 (no CPU here runs fp16 matmuls faster than fp32); float32 and
    float64 checkpoints as stored.
    """
    if device.split(":")[0] != "cpu":
        return stored
    if stored == "BF16":
        return "BF16" if native_bf16() else "F32"
    if stored == "F16":
        return "F32"
    return stored


def describe_cpu() -> str:
    """One line: the CPU's bf16 support and what the default compute dtype is therefore."""
    flags = cpu_flags()
    if flags is None:
        how = "bf16 measured " + ("faster" if native_bf16() else "slower") + " than fp32"
    else:
        found = sorted(flags & BF16_FLAGS)
        how = (
            f"native bf16 ({', '.join(found)})" if found else "no native bf16 (no AMX/AVX512-BF16)"
        )
    return f"CPU with {how}: bf16 checkpoints computed in {'bf16' if native_bf16() else 'fp32'}"
