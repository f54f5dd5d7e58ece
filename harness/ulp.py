"""Units in the last place of the stored dtype, and the rounding constants the oracle derives from.

The weight oracle compares a merged tensor ``M`` with a reference ``R`` computed in a wider dtype
(fp32 for half-precision checkpoints, fp64 for fp32 ones). Distances are measured in ULPs of the
dtype the checkpoint *stores*: the spacing of representable numbers at a value's binade,
``2 ** (max(floor(log2 |x|), min_exponent) - mantissa_bits)``, which is also correct for
subnormals and zero (the subnormal spacing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.dtypes import MANTISSA_BITS, MIN_EXPONENT

if TYPE_CHECKING:
    import torch

#: Unit roundoff (half the machine epsilon) of the dtypes the oracle computes in.
U32 = 2.0**-24
U64 = 2.0**-53


def unit_roundoff(code: str) -> float:
    """Half the spacing between 1 and the next representable number: ``2 ** -(mantissa + 1)``."""
    return 2.0 ** -(MANTISSA_BITS[code] + 1)


def gamma(n: int, u: float) -> float:
    """Higham's ``γ_n = n·u / (1 - n·u)``: the relative error bound of an ``n``-term dot product."""
    nu = n * u
    if nu >= 1:
        return float("inf")
    return nu / (1.0 - nu)


def compute_dtype(code: str) -> torch.dtype:
    """The dtype the reference is computed in: fp64 for fp32/fp64 checkpoints, else fp32."""
    import torch

    return torch.float64 if code in ("F32", "F64") else torch.float32


def compute_roundoff(code: str) -> float:
    """Unit roundoff of :func:`compute_dtype` for a stored dtype."""
    return U64 if code in ("F32", "F64") else U32


def ulp(x: torch.Tensor, code: str) -> torch.Tensor:
    """Spacing of the stored dtype ``code`` at ``|x|`` (``x`` in a wider float dtype: fp32/fp64).

    Masking the exponent bits of ``x`` gives ``2 ** floor(log2 |x|)`` exactly (three cheap
    elementwise passes, no ``log2``); scaling by ``2 ** -mantissa_bits`` gives the spacing, and the
    clamp at the stored dtype's subnormal spacing covers tiny values and zero. Non-finite inputs
    give non-finite spacings.
    """
    import torch

    if x.dtype == torch.float32:
        bits = torch.bitwise_and(x.view(torch.int32), 0x7F800000).view(torch.float32)
    elif x.dtype == torch.float64:
        bits = torch.bitwise_and(x.view(torch.int64), 0x7FF0000000000000).view(torch.float64)
    else:
        raise TypeError(f"ulp() needs an fp32 or fp64 tensor, got {x.dtype}")
    return torch.clamp_min(bits * 2.0 ** -MANTISSA_BITS[code], smallest_spacing(code))


def smallest_spacing(code: str) -> float:
    """The subnormal spacing of ``code`` (its ULP at zero)."""
    return 2.0 ** (MIN_EXPONENT[code] - MANTISSA_BITS[code])
