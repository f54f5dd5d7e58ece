"""Compare one merged tensor with its reference in ULPs of the stored dtype (pure, per tensor).

``compare_edited`` judges a tensor the adapter changes against ``R`` and ``S`` (see
:mod:`harness.deltas.apply`), row block by row block, with the rule of :mod:`harness.oracle`;
``compare_untouched`` requires a tensor the adapter does not touch to be bit-identical to the
base. Both return a :class:`TensorCheck`, the record every weights check and the diagnosis read.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.deltas.apply import reference_rows, rounded_paths, value_rows
from harness.deltas.lowrank import ROUNDED_FACTORS
from harness.dtypes import FLOATING, torch_dtype_name
from harness.io.safetensors import TensorInfo, tensor_from_bytes
from harness.ulp import compute_dtype, ulp

if TYPE_CHECKING:
    import torch

    from harness.deltas.base import Edit

#: Elements per row block of the reference computation (fits the CPU caches, keeps RAM flat).
BLOCK_ELEMENTS = int(os.environ.get("MERGE_HARNESS_BLOCK", 1 << 17))


class Role(str, enum.Enum):
    """What the adapter does to a tensor."""

    #: A delta applies (possibly after copies or token rows).
    TARGETED = "targeted"
    #: Only full copies (``modules_to_save``) or trainable token rows replace values.
    REPLACED = "replaced"
    #: The adapter does not touch it: it must equal the base bit for bit.
    UNTOUCHED = "untouched"


@dataclass
class Worst:
    """The element of a tensor furthest outside (or closest to) its bound."""

    index: tuple[int, ...]
    merged: float
    reference: float
    base: float
    ulp_error: float
    bound_ulps: float

    def to_json(self) -> dict[str, Any]:
        """JSON view."""
        return {
            "index": list(self.index),
            "merged": self.merged,
            "reference": self.reference,
            "base": self.base,
            "ulp_error": self.ulp_error,
            "bound_ulps": self.bound_ulps,
        }


@dataclass
class TensorCheck:
    """The oracle's verdict on one merged tensor."""

    name: str
    #: ``targeted`` (a delta applies), ``replaced`` (only copies/token rows), ``untouched``.
    role: Role
    dtype: str
    numel: int
    edits: list[str] = field(default_factory=list)
    #: Elements outside the bound (targeted/replaced), or differing from the base (untouched).
    failed: int = 0
    max_ulp: float = 0.0
    #: Largest ``|M - R| / bound`` over the elements (<= 1 passes).
    bound_use: float = 0.0
    worst: Worst | None = None
    #: Elements the reference moves beyond rounding that still hold the base value.
    unchanged: int = 0
    #: Elements that differ from the base.
    changed: int = 0
    #: Merged elements that are NaN or Inf where the reference is finite.
    nonfinite: int = 0
    #: Of those, elements whose reference lies beyond the stored dtype's largest finite value.
    overflow: int = 0
    #: The largest ``|R|`` among the overflowing elements.
    overflow_peak: float = 0.0
    expected_norm: float = 0.0
    found_norm: float = 0.0
    error_norm: float = 0.0
    diagnosis: str | None = None
    note: str | None = None
    #: The peft arithmetic the tensor was judged by when it is not the default one.
    arithmetic: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the tensor passes both the tolerance and the change requirement."""
        return self.failed == 0 and self.unchanged == 0 and self.nonfinite == 0

    @property
    def ratio(self) -> float | None:
        """``||M - W|| / ||R - W||``: 1 for a correct merge, 0 for a no-op, 2 for a double one."""
        return self.found_norm / self.expected_norm if self.expected_norm > 0 else None

    def layer_row(self) -> dict[str, Any]:
        """One row of the per-layer weight-difference table."""
        return {
            "tensor": self.name,
            "role": self.role.value,
            "edits": list(self.edits),
            "expected_norm": self.expected_norm,
            "found_norm": self.found_norm,
            "ratio": self.ratio,
            "relative_error": self.error_norm / self.expected_norm if self.expected_norm else None,
            "max_ulp": self.max_ulp,
            "bound_use": self.bound_use,
            "ok": self.ok,
            "arithmetic": self.arithmetic,
        }


_BITS = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (so that NaN == NaN and -0 != +0 compare as stored)."""
    import torch

    return tensor.view(getattr(torch, _BITS[tensor.element_size()]))


class _Accumulator:
    """Per-tensor statistics gathered block by block."""

    def __init__(self, check: TensorCheck, code: str, k: float, shape: tuple[int, ...]) -> None:
        self.check = check
        self.code = code
        self.k = k
        self.shape = shape
        self.squares = [0.0, 0.0, 0.0]
        self.best_ratio = -1.0
        #: Elements equal to the correctly rounded reference (within the bound by proof).
        self.matched = 0

    def norms(self, m: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> None:
        """Accumulate ``||R-W||``, ``||M-R||``, ``||M-W||``.

        ``m`` and ``w`` may be stored-dtype blocks (promoted to ``r``'s dtype on the fly);
        ``M - W`` is formed as ``(M - R) + (R - W)`` in place, one pass fewer.
        """
        import torch

        moved = torch.sub(r, w)
        off = torch.sub(m, r)
        self.squares[0] += float(torch.linalg.vector_norm(moved)) ** 2
        self.squares[2] += float(torch.linalg.vector_norm(off)) ** 2
        self.squares[1] += float(torch.linalg.vector_norm(off.add_(moved))) ** 2

    def changed(self, m_stored: torch.Tensor, w_stored: torch.Tensor) -> None:
        """Count elements whose stored bits differ from the base's."""
        import torch

        self.check.changed += int(torch.count_nonzero(_bits(m_stored) != _bits(w_stored)))

    def exact(
        self,
        rows: torch.Tensor,
        m: torch.Tensor,
        w: torch.Tensor,
        r: torch.Tensor,
        s: torch.Tensor,
    ) -> None:
        """Full evaluation of some rows: bound, change requirement, worst element."""
        import torch

        check, code, k = self.check, self.code, self.k
        err = (m - r).abs()
        spacing = ulp(r.abs() + s, code)
        bound = spacing * k + s
        # a bound that is not finite (the reference overflowed) proves nothing: outside
        inside = (err <= bound) & torch.isfinite(bound)
        check.failed += int(inside.numel() - int(inside.sum()))
        ulps = torch.nan_to_num(err / spacing, nan=math.inf, posinf=math.inf)
        if ulps.numel():
            check.max_ulp = max(check.max_ulp, float(ulps.max()))
        ratio = torch.nan_to_num(err / bound.clamp_min(torch.finfo(bound.dtype).tiny),
                                 nan=math.inf).reshape(-1)
        if ratio.numel():
            flat = int(torch.argmax(ratio))
            if float(ratio[flat]) > self.best_ratio:
                self.best_ratio = float(ratio[flat])
                per_row = ratio.numel() // max(len(rows), 1)
                row = int(rows[flat // per_row]) if per_row else 0
                rest = _unravel(flat % per_row, self.shape[1:]) if per_row else ()
                check.worst = Worst(
                    (row, *rest) if len(self.shape) > 1 else (row,),
                    float(m.reshape(-1)[flat]),
                    float(r.reshape(-1)[flat]),
                    float(w.reshape(-1)[flat]),
                    float(ulps.reshape(-1)[flat]),
                    float(bound.reshape(-1)[flat] / spacing.reshape(-1)[flat]),
                )
        required = (r - w).abs() > ulp(w, code).mul_(0.5).add_(s)
        check.unchanged += int((required & (m == w)).sum())
        broken = ~torch.isfinite(m) & torch.isfinite(r)
        if bool(broken.any()):
            check.nonfinite += int(broken.sum())
            # the merge computed R correctly but it does not fit the stored dtype
            beyond = broken & (r.abs() >= overflow_threshold(code))
            if bool(beyond.any()):
                check.overflow += int(beyond.sum())
                check.overflow_peak = max(check.overflow_peak, float(r.abs()[beyond].max()))

    def finish(self) -> None:
        """Square roots of the norms; matched elements used at most half an ULP.

        A non-finite ``||R - W||`` means the reference itself is NaN or Inf somewhere (the
        delta overflows, or the base weight is not finite): no element there can be verified,
        so the tensor fails, whatever the merged value (an Inf equals an Inf).
        """
        if not math.isfinite(self.squares[0]):
            self.check.failed = max(self.check.failed, 1)
            self.check.diagnosis = (
                "the reference is not finite (the adapter's delta overflows, or the base holds"
                " NaN/Inf): no bound can verify this tensor"
            )
        if self.matched:
            self.best_ratio = max(self.best_ratio, 0.5 / self.k)
            self.check.max_ulp = max(self.check.max_ulp, 0.5)
        self.check.bound_use = max(self.best_ratio, 0.0)
        self.check.expected_norm, self.check.found_norm, self.check.error_norm = (
            math.sqrt(v) for v in self.squares
        )


#: Short names of the stored dtypes for messages.
DTYPE_NAMES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}


def overflow_threshold(code: str) -> float:
    """The smallest ``|x|`` that rounds to Inf in the stored dtype (round to nearest even).

    ``max + ulp(max) / 2``: a value at or beyond the midpoint between the largest finite number
    and the next power of two rounds away to infinity.
    """
    import torch

    info = torch.finfo(getattr(torch, torch_dtype_name(code)))
    _, exponent = math.frexp(float(info.max))  # max = m * 2**exponent, 0.5 <= m < 1
    return float(info.max) + 2.0 ** (exponent - 1) * float(info.eps) / 2


def overflow_diagnosis(check: TensorCheck) -> str | None:
    """The cause of non-finite merged elements, when the reference explains them."""
    if not check.nonfinite:
        return None
    name = DTYPE_NAMES.get(check.dtype, check.dtype)
    if check.overflow:
        return (
            f"overflow: W + delta exceeds the {name} range ({check.overflow} element(s) are Inf"
            f" where the exact merge is {check.overflow_peak:.6g}, beyond the largest finite"
            f" {name} value): the merged model cannot hold this merge in {name}; merge and"
            " save in bf16 or fp32"
        )
    return (
        f"{check.nonfinite} element(s) are NaN or Inf where the exact merge is finite and within"
        f" the {name} range"
    )


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index: list[int] = []
    for dim in reversed(shape):
        index.append(flat % dim if dim else 0)
        flat = flat // dim if dim else 0
    return tuple(reversed(index))


def compare_edited(
    name: str,
    merged: torch.Tensor,
    base: torch.Tensor,
    edits: Sequence[Edit],
    code: str,
    k: float,
    role: Role = Role.TARGETED,
) -> TensorCheck:
    """Compare one merged tensor with its reference, row block by row block.

    Fast path (``k >= 1/2``): an element equal to the reference rounded to the stored dtype is
    within ``ulp/2 <= k*ulp(|R|+S) + S`` of it, and cannot be an unchanged element the change
    requirement needs (the reference would round to the base), so only rows holding another
    value are evaluated with the full bound.
    """
    import torch

    cd = compute_dtype(code)
    check = TensorCheck(name, role, code, merged.numel(), [e.describe() for e in edits])
    shape = tuple(merged.shape) or (1,)
    acc = _Accumulator(check, code, k, shape)
    m_all, w_all = merged.reshape(shape), base.reshape(shape)
    rows = shape[0]
    per_row = merged.numel() // rows if rows else 0
    blockable = all(e.blockable for e in edits)
    step = max(1, BLOCK_ELEMENTS // per_row) if blockable and per_row else max(rows, 1)
    fast = k >= 0.5
    for start in range(0, rows, step):
        block = slice(start, min(rows, start + step))
        w_stored, m_stored = w_all[block], m_all[block]
        acc.changed(m_stored, w_stored)
        if not fast:
            w = w_stored.to(cd)
            r, s = reference_rows(w, edits, block, code, k)
            m = m_stored.to(cd)
            acc.norms(m, w, r)
            acc.exact(torch.arange(block.start, block.stop), m, w, r, s)
            continue
        r = value_rows(w_stored, edits, block, code)
        mismatch = r.to(m_stored.dtype) != m_stored
        low, high = torch.aminmax(m_stored)
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            # an Inf equal to the reference rounded to Inf is still an overflow: look at it
            mismatch |= ~torch.isfinite(m_stored)
        wrong = int(torch.count_nonzero(mismatch))
        acc.matched += mismatch.numel() - wrong
        acc.norms(m_stored, w_stored, r)
        if wrong:
            bad = mismatch.reshape(r.shape[0], -1).any(dim=1).nonzero().reshape(-1)
            numbers = bad + start
            sub_w = w_stored[bad].to(cd)
            sub_r, sub_s = reference_rows(sub_w, edits, numbers, code, k)
            acc.exact(numbers, m_stored[bad].to(cd), sub_w, sub_r, sub_s)
    acc.finish()
    check.diagnosis = overflow_diagnosis(check) or check.diagnosis
    if check.changed == 0 and check.expected_norm > 0 and check.ok:
        check.note = f"the delta is below {code} resolution everywhere: a correct merge is a no-op"
    return check


def compare_judged(
    name: str,
    merged: torch.Tensor,
    base: torch.Tensor,
    edits: Sequence[Edit],
    code: str,
    k: float,
    role: Role = Role.TARGETED,
) -> TensorCheck:
    """:func:`compare_edited`, then by the arithmetic of a recognised peft path if that fails.

    The recognised path: LoRA factors held in the stored half-precision dtype when merging
    (``autocast_adapter_dtype=False``, ``.to(torch.bfloat16)``, PiSSA/OLoRA converted in bf16).
    Its reference uses the rounded factors and its bound the roundings that path adds
    (:data:`~harness.deltas.lowrank.ROUNDED_DELTA_ULPS`); the change requirement applies as
    ever, so a no-op merge of a tiny delta still fails. The tensor passes by that path only
    when every element fits it, and says so in :attr:`TensorCheck.arithmetic`.
    """
    check = compare_edited(name, merged, base, edits, code, k, role)
    if check.ok or check.nonfinite:
        return check
    twins = rounded_paths(edits, code)
    if twins is None:
        return check
    other = compare_edited(name, merged, base, twins, code, k, role)
    if not other.ok:
        return check
    short = DTYPE_NAMES.get(code, code)
    other.arithmetic = ROUNDED_FACTORS.format(dtype=short, torch=torch_dtype_name(code))
    return other


def compare_untouched(
    name: str, info: TensorInfo, merged: bytearray, base: bytearray
) -> TensorCheck:
    """An untouched tensor must be bit-identical to the base."""
    check = TensorCheck(name, Role.UNTOUCHED, info.dtype, info.numel)
    if merged == base:
        return check
    import torch

    m = tensor_from_bytes(info, merged).reshape(-1)
    w = tensor_from_bytes(info, base).reshape(-1)
    if info.dtype in FLOATING and not info.dtype.startswith("F8"):
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[m.element_size()]
        differ = m.view(bits) != w.view(bits)
        diff = (m.double() - w.double()).abs()
        flat = int(torch.argmax(torch.nan_to_num(diff, nan=math.inf)))
    else:
        # integers, booleans, complex and scale formats: compared (and shown) as stored bits
        m, w = _bits(m), _bits(w)
        differ = m != w
        flat = int(torch.argmax(differ.to(torch.uint8)))
    check.failed = check.changed = int(differ.sum())
    check.worst = Worst(
        _unravel(flat, info.shape or (1,)),
        float(m[flat]),
        float(w[flat]),
        float(w[flat]),
        math.inf,
        0.0,
    )
    check.found_norm = float(torch.linalg.vector_norm(m.double() - w.double()))
    return check
