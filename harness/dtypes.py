"""Safetensors dtype codes, their sizes, and their torch equivalents (torch imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Bytes per element for every dtype code the safetensors format defines.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

#: Floating-point dtype codes (finite checks and ULP comparisons apply to these).
FLOATING = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})

#: Explicit mantissa bits (without the implicit one) and the smallest normal exponent.
MANTISSA_BITS: dict[str, int] = {
    "F8_E4M3": 3,
    "F8_E5M2": 2,
    "F16": 10,
    "BF16": 7,
    "F32": 23,
    "F64": 52,
}
MIN_EXPONENT: dict[str, int] = {
    "F8_E4M3": -6,
    "F8_E5M2": -14,
    "F16": -14,
    "BF16": -126,
    "F32": -126,
    "F64": -1022,
}

_TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}


def to_torch(code: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype code."""
    import torch

    dtype = getattr(torch, _TORCH_NAMES[code], None)
    if not isinstance(dtype, torch.dtype):
        raise KeyError(f"this torch has no dtype for safetensors {code}")
    return dtype


def from_torch(dtype: torch.dtype) -> str:
    """The safetensors dtype code for a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    for code, torch_name in _TORCH_NAMES.items():
        if torch_name == name:
            return code
    raise KeyError(f"no safetensors dtype for {dtype}")


def from_name(name: str) -> str:
    """A dtype code from a user-facing name: ``bf16``, ``bfloat16``, ``torch.float16``, ``F32``."""
    key = name.strip().removeprefix("torch.").lower()
    aliases = {
        "bf16": "BF16",
        "bfloat16": "BF16",
        "fp16": "F16",
        "f16": "F16",
        "float16": "F16",
        "half": "F16",
        "fp32": "F32",
        "f32": "F32",
        "float32": "F32",
        "float": "F32",
        "fp64": "F64",
        "f64": "F64",
        "float64": "F64",
    }
    if key in aliases:
        return aliases[key]
    if name.upper() in ITEMSIZE:
        return name.upper()
    raise KeyError(f"unknown dtype name {name!r}")


#: Explicit mantissa bits of the dtypes forward passes run in.
FORWARD_DTYPES = ("F64", "F32", "BF16", "F16")


def torch_dtype_name(code: str | None) -> str:
    """The torch dtype name to load a model in (``float32``...), or ``auto`` for ``None``."""
    if code is None:
        return "auto"
    return _TORCH_NAMES.get(code, "auto")
