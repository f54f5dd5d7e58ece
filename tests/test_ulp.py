"""ULPs of the stored dtype, checked against torch.nextafter in that dtype."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.ulp import U32, compute_dtype, gamma, smallest_spacing, ulp, unit_roundoff

STORED = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def spacing_above(value: torch.Tensor) -> float:
    """The distance from a representable value to the next one away from zero, by nextafter."""
    towards = torch.full_like(value, math.inf) * (1 if float(value) >= 0 else -1)
    return abs(float(torch.nextafter(value, towards).double() - value.double()))


@pytest.mark.parametrize("code", sorted(STORED))
@given(data=st.data())
def test_ulp_is_the_spacing_of_the_stored_dtype(code, data):
    dtype = STORED[code]
    info = torch.finfo(dtype)
    magnitude = data.draw(st.floats(min_value=0, max_value=float(info.max) / 2, allow_nan=False))
    sign = data.draw(st.sampled_from([1.0, -1.0]))
    stored = torch.tensor(sign * magnitude, dtype=dtype)
    wide = stored.to(compute_dtype(code))
    assert float(ulp(wide.reshape(1), code)[0]) == spacing_above(stored)


@pytest.mark.parametrize("code", sorted(STORED))
def test_zero_and_subnormals_use_the_subnormal_spacing(code):
    dtype = STORED[code]
    tiny = torch.finfo(dtype).smallest_normal
    cd = compute_dtype(code)
    values = torch.tensor([0.0, tiny / 4, -tiny / 2], dtype=cd)
    assert ulp(values, code).tolist() == [smallest_spacing(code)] * 3
    assert smallest_spacing(code) == spacing_above(torch.tensor(0.0, dtype=dtype))


def test_a_value_inside_a_binade_has_that_binade_spacing():
    # 1.3 lies in [1, 2): bf16 spacing 2^-7 there, fp16 2^-10, fp32 2^-23
    x = torch.tensor([1.3, -1.3])
    assert ulp(x, "BF16").tolist() == [2**-7] * 2
    assert ulp(x, "F16").tolist() == [2**-10] * 2
    assert ulp(x.double(), "F32").tolist() == [2**-23] * 2


def test_non_finite_inputs_give_non_finite_spacings():
    spacing = ulp(torch.tensor([math.inf, math.nan]), "BF16")
    assert not torch.isfinite(spacing).any()


def test_ulp_rejects_narrow_inputs():
    with pytest.raises(TypeError):
        ulp(torch.tensor([1.0], dtype=torch.bfloat16), "BF16")


def test_rounding_constants():
    assert unit_roundoff("BF16") == 2**-8
    assert unit_roundoff("F32") == U32
    assert gamma(4, U32) == pytest.approx(4 * U32, rel=1e-6)
    assert gamma(2**25, U32) == math.inf
    assert compute_dtype("BF16") == torch.float32
    assert compute_dtype("F32") == torch.float64
