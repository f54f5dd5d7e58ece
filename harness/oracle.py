"""The exact weight oracle: every merged tensor against base + adapter, streamed, in ULPs.

One pass reads the merged checkpoint in file order together with each tensor's base counterpart
(a reader thread stays ahead of the arithmetic; sha256 digests and NaN/Inf scans of both run on a
second thread, so the pass also yields the canonical digests the structure and hash checks need).
For a tensor the adapter changes, the reference ``R`` is computed in a wide dtype (fp32 for
half-precision checkpoints, fp64 for fp32) by the delta registry, row block by row block, together
with a bound ``S`` on how far a *correct* merge's value before its final rounding can be from
``R``. The merged tensor ``M`` passes when, elementwise,

    |M - R| <= k * ulp(|R| + S) + S

with ``k`` the ULP tolerance (a correct merge needs ``k = 1/2``: one round-to-nearest; the
default ``k = 1`` leaves a factor of two). It must also *change* wherever the reference moves
the base ``W`` by more than rounding can hide: ``|R - W| > ulp(W)/2 + S  =>  M != W``, which
catches a no-op merge of a delta too small for the tolerance check. A tensor the adapter does
not touch must be bit-identical to the base. Memory: the two tensors' bytes plus row-block
temporaries (about 2^19 elements), never a whole model.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.checkpoint import Checkpoint, TensorInfo, tensor_from_bytes
from harness.dtypes import FLOATING
from harness.errors import HarnessError
from harness.hashing import Manifest, combine
from harness.scan import NonFinite, ScanResult, scan_tensor

if TYPE_CHECKING:
    import torch

    from harness.adapter import Adapter
    from harness.deltas import Edit, Plan
    from harness.deltas.base import Rows

#: Elements per row block of the reference computation (fits the CPU caches, keeps RAM flat).
BLOCK_ELEMENTS = int(os.environ.get("MERGE_HARNESS_BLOCK", 1 << 17))
#: Bytes of tensors in flight: at least this, or one and a half of the largest merged/base pair.
MIN_BUDGET = 256 * 1024 * 1024
#: The printed form of the bound.
BOUND_TEXT = (
    "|M-R| <= k*ulp(|R|+S) + S, S = 1.5*ulp(delta) + (γ_r(u32)+γ_(r+1)(u_c))*|s|*||B_i||*||A_j||"
    " + 2*u_c*(|W|+|delta|) per LoRA step (DoRA, IA3, LoHa, LoKr: their own S)"
)


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
    role: str
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
    expected_norm: float = 0.0
    found_norm: float = 0.0
    error_norm: float = 0.0
    diagnosis: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the tensor passes both the tolerance and the change requirement."""
        return self.failed == 0 and self.unchanged == 0

    @property
    def ratio(self) -> float | None:
        """``||M - W|| / ||R - W||``: 1 for a correct merge, 0 for a no-op, 2 for a double one."""
        return self.found_norm / self.expected_norm if self.expected_norm > 0 else None

    def layer_row(self) -> dict[str, Any]:
        """One row of the per-layer weight-difference table."""
        return {
            "tensor": self.name,
            "role": self.role,
            "edits": list(self.edits),
            "expected_norm": self.expected_norm,
            "found_norm": self.found_norm,
            "ratio": self.ratio,
            "relative_error": self.error_norm / self.expected_norm if self.expected_norm else None,
            "max_ulp": self.max_ulp,
            "bound_use": self.bound_use,
            "ok": self.ok,
        }


@dataclass
class OracleResult:
    """Everything one oracle pass found."""

    adapters: list[dict[str, str]]
    #: An adapter-level cause that makes every weights check fail (unsupported type, bad config).
    problem: str | None
    tensors: list[TensorCheck]
    k: float
    seconds: float = 0.0
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)

    def by_role(self, role: str) -> list[TensorCheck]:
        """The tensors of one role, in file order."""
        return [t for t in self.tensors if t.role == role]

    def layers(self) -> list[dict[str, Any]]:
        """The per-layer weight-difference table: every targeted or replaced tensor."""
        return [t.layer_row() for t in self.tensors if t.role != "untouched"]


# ---- comparison -------------------------------------------------------------------------


def _reference(
    w: torch.Tensor, edits: Sequence[Edit], rows: Rows, code: str, k: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, S)`` for a block: the edits applied in order, each intermediate result rounded."""
    from harness.ulp import ulp

    value = w
    bound: torch.Tensor | None = None
    for step, edit in enumerate(edits):
        incoming = None
        if step and bound is not None:
            # the previous edit's result was rounded to the stored dtype before this one
            incoming = bound + ulp(value.abs() + bound, code) * k
        result = edit.reference(value, incoming, rows, code)
        value, bound = result.value, result.bound
    assert bound is not None
    return value, bound


def _value(w: torch.Tensor, edits: Sequence[Edit], rows: Rows, code: str) -> torch.Tensor:
    """``R`` alone for a block (the fast path: no bound)."""
    value = w
    for edit in edits:
        value = edit.value(value, rows, code)
    return value


def reference_tensor(
    w: torch.Tensor, edits: Sequence[Edit], code: str, k: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, S)`` of a whole tensor (``w`` in the compute dtype); used by the diagnosis."""
    return _reference(w, edits, slice(None), code, k)


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

        from harness.ulp import ulp

        check, code, k = self.check, self.code, self.k
        err = (m - r).abs()
        spacing = ulp(r.abs() + s, code)
        bound = spacing * k + s
        inside = err <= bound
        check.failed += int(inside.numel() - int(inside.sum()))
        ulps = torch.nan_to_num(err / spacing, nan=math.inf)
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

    def finish(self) -> None:
        """Square roots of the norms; matched elements used at most half an ULP."""
        if self.matched:
            self.best_ratio = max(self.best_ratio, 0.5 / self.k)
            self.check.max_ulp = max(self.check.max_ulp, 0.5)
        self.check.bound_use = max(self.best_ratio, 0.0)
        self.check.expected_norm, self.check.found_norm, self.check.error_norm = (
            math.sqrt(v) for v in self.squares
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
    role: str = "targeted",
) -> TensorCheck:
    """Compare one merged tensor with its reference, row block by row block.

    Fast path (``k >= 1/2``): an element equal to the reference rounded to the stored dtype is
    within ``ulp/2 <= k*ulp(|R|+S) + S`` of it, and cannot be an unchanged element the change
    requirement needs (the reference would round to the base), so only rows holding another
    value are evaluated with the full bound.
    """
    import torch

    from harness.ulp import compute_dtype

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
            r, s = _reference(w, edits, block, code, k)
            m = m_stored.to(cd)
            acc.norms(m, w, r)
            acc.exact(torch.arange(block.start, block.stop), m, w, r, s)
            continue
        r = _value(w_stored, edits, block, code)
        mismatch = r.to(m_stored.dtype) != m_stored
        wrong = int(torch.count_nonzero(mismatch))
        acc.matched += mismatch.numel() - wrong
        acc.norms(m_stored, w_stored, r)
        if wrong:
            bad = mismatch.reshape(r.shape[0], -1).any(dim=1).nonzero().reshape(-1)
            numbers = bad + start
            sub_w = w_stored[bad].to(cd)
            sub_r, sub_s = _reference(sub_w, edits, numbers, code, k)
            acc.exact(numbers, m_stored[bad].to(cd), sub_w, sub_r, sub_s)
    acc.finish()
    if check.changed == 0 and check.expected_norm > 0 and check.ok:
        check.note = f"the delta is below {code} resolution everywhere: a correct merge is a no-op"
    return check


def compare_untouched(
    name: str, info: TensorInfo, merged: bytearray, base: bytearray
) -> TensorCheck:
    """An untouched tensor must be bit-identical to the base."""
    check = TensorCheck(name, "untouched", info.dtype, info.numel)
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


# ---- the pass ---------------------------------------------------------------------------


@dataclass
class _Work:
    """What to do with one merged tensor: compare with a base tensor under some edits."""

    name: str
    base: str
    edits: list[Edit]


def _work_list(merged: Checkpoint, base: Checkpoint, plan: Plan | None) -> dict[str, list[_Work]]:
    """Per merged tensor, the comparisons to run (a tied base may add a virtual head)."""
    work: dict[str, list[_Work]] = {}
    source = plan.target.tie_source if plan is not None else None
    head = plan.tied_head if plan is not None else None
    for name in merged.tensors:
        if name in base.tensors:
            edits = plan.for_tensor(name) if plan is not None else []
            work[name] = [_Work(name, name, edits)]
        elif plan is not None and name == head and source is not None:
            work[name] = [_Work(name, source, plan.for_tensor(name))]
    if (
        plan is not None
        and source is not None
        and head is not None
        and head not in merged.tensors
        and source in merged.tensors
        and plan.touches_tie()
    ):
        # The merged model keeps the tie: its one tensor must serve as the head too.
        work[source].append(_Work(f"{head} (tied to {source})", source, plan.for_tensor(head)))
    return work


@dataclass
class _Done:
    """What processing one merged tensor produced."""

    name: str
    digest: str | None = None
    nonfinite: NonFinite | None = None
    base_name: str | None = None
    base_digest: str | None = None
    base_nonfinite: NonFinite | None = None
    checks: list[TensorCheck] = field(default_factory=list)
    nbytes: int = 0


def _missing(
    merged: Checkpoint, base: Checkpoint, plan: Plan, work: dict[str, list[_Work]]
) -> list[TensorCheck]:
    """Tensors the adapter changes that the merged checkpoint does not hold: failures."""
    covered = {job.name for jobs in work.values() for job in jobs} | set(work)
    covered |= {job.name.split(" (tied to ")[0] for jobs in work.values() for job in jobs}
    missing: list[TensorCheck] = []
    for name, edits in sorted(plan.edits.items()):
        if name in covered or not edits:
            continue
        if name == plan.tied_head and name not in merged.tensors and not plan.touches_tie():
            continue
        info = base.tensors[edits[0].base]
        missing.append(TensorCheck(
            name, _role(edits), info.dtype, info.numel, [e.describe() for e in edits],
            failed=info.numel, diagnosis="the tensor is missing from the merged checkpoint",
        ))
    return missing


def run_oracle(
    merged: Checkpoint,
    base: Checkpoint,
    adapters: Sequence[Adapter],
    k: float = 1.0,
    *,
    scans: bool = True,
    workers: int | None = None,
) -> tuple[OracleResult, ScanResult | None, ScanResult | None]:
    """Stream ``merged`` against ``base`` + ``adapters``; return the verdicts and both scans.

    Raises :class:`HarnessError` only when a checkpoint cannot be read; adapter problems
    (unsupported type, invalid config, modules matching nothing) are recorded in
    ``result.problem`` so the untouched tensors and digests are still computed. Tensors are
    processed on ``workers`` threads (default: the usable CPUs), results kept in file order.
    """
    from harness.deltas import Target, plan_adapters
    from harness.parallel import (
        BufferPool,
        ByteBudget,
        default_workers,
        pipeline,
        read_into,
        single_threaded_torch,
    )

    started = time.perf_counter()
    problem: str | None = None
    plan: Plan | None = None
    try:
        plan = plan_adapters(list(adapters), Target(base.tensors, base.config or {}))
    except HarnessError as exc:
        problem = str(exc)
    work = _work_list(merged, base, plan)
    sources = {name: jobs[0].base for name, jobs in work.items()}
    result = OracleResult(
        [{"path": str(a.root), "peft_type": a.peft_type} for a in adapters], problem, [], k
    )

    def process(item: tuple[TensorInfo, bytearray, bytearray | None]) -> _Done:
        info, data, other = item
        try:
            return examine(info, data, other)
        finally:
            pool.put(data)
            if other is not None:
                pool.put(other)

    def examine(info: TensorInfo, data: bytearray, other: bytearray | None) -> _Done:
        done = _Done(info.name, nbytes=len(data) + (len(other) if other is not None else 0))
        if scans:
            done.digest, done.nonfinite = scan_tensor(info, data)
            if other is not None and sources.get(info.name) == info.name:
                done.base_name = info.name
                done.base_digest, done.base_nonfinite = scan_tensor(base.tensors[info.name], other)
        if other is not None and problem is None and plan is not None:
            jobs = work[info.name]
            try:
                for job in jobs:
                    check = _check_one(job, info, data, other, base.tensors[job.base], k)
                    if check is None:
                        continue
                    if not check.ok and check.diagnosis is None:
                        from harness.diagnosis import diagnose

                        check.diagnosis = diagnose(check, job.edits, plan, info, data,
                                                   base.tensors[job.base], other, k)
                    done.checks.append(check)
            finally:
                for job in jobs:
                    for edit in job.edits:
                        edit.release()
        return done

    def rest() -> Iterator[tuple[TensorInfo, bytearray, bytearray | None]]:
        """Base tensors the merged pass did not read (for the base's digest)."""
        seen = {source for name, source in sources.items() if source == name}
        for info in base.in_file_order():
            if info.name not in seen:
                yield info, base.read_bytes(info.name), None

    merged_digests: dict[str, str] = {}
    base_digests: dict[str, str] = {}
    merged_bad: dict[str, NonFinite] = {}
    base_bad: dict[str, NonFinite] = {}
    count = workers if workers is not None else default_workers()

    def size(info: TensorInfo) -> int:
        source = sources.get(info.name)
        return info.nbytes + (base.tensors[source].nbytes if source is not None else 0)

    largest = max((size(info) for info in merged.tensors.values()), default=0)
    budget = ByteBudget(max(MIN_BUDGET, largest + largest // 2))
    pool = BufferPool(budget.limit // 4)

    def load(checkpoint: Checkpoint, name: str) -> bytearray:
        if checkpoint.is_pickle:
            return checkpoint.read_bytes(name)
        return read_into(checkpoint.tensors[name], pool)

    def read(info: TensorInfo) -> tuple[TensorInfo, bytearray, bytearray | None]:
        source = sources.get(info.name)
        other = load(base, source) if source is not None else None
        return info, load(merged, info.name), other
    try:
        with single_threaded_torch():
            order = merged.in_file_order()
            for done in pipeline(order, read, process, size, budget, count):
                budget.release(done.nbytes)
                result.bytes_read += done.nbytes
                result.tensors.extend(done.checks)
                if done.digest is not None:
                    merged_digests[done.name] = done.digest
                if done.nonfinite is not None:
                    merged_bad[done.name] = done.nonfinite
                if done.base_name is not None and done.base_digest is not None:
                    base_digests[done.base_name] = done.base_digest
                if done.base_name is not None and done.base_nonfinite is not None:
                    base_bad[done.base_name] = done.base_nonfinite
            if scans:
                for info, data, _ in rest():
                    result.bytes_read += len(data)
                    base_digests[info.name], found = scan_tensor(info, data)
                    if found is not None:
                        base_bad[info.name] = found
    finally:
        if plan is not None:
            plan.release()
    if plan is not None and problem is None:
        result.tensors.extend(_missing(merged, base, plan, work))
    result.seconds = time.perf_counter() - started
    if not scans:
        return result, None, None
    merged_scan = ScanResult(Manifest(combine(merged_digests), merged_digests, {}), merged_bad)
    base_scan = ScanResult(Manifest(combine(base_digests), base_digests, {}), base_bad)
    return result, merged_scan, base_scan


def _check_one(
    job: _Work,
    info: TensorInfo,
    data: bytearray,
    other: bytearray,
    base_info: TensorInfo,
    k: float,
) -> TensorCheck | None:
    """Compare one merged tensor (or the virtual tied head) with its base tensor and edits."""
    if info.shape != base_info.shape:
        # values cannot be compared element by element: a failure, never a silent pass
        cause = f"shape {list(info.shape)} differs from the base's {list(base_info.shape)}"
        return TensorCheck(job.name, _role(job.edits), info.dtype, info.numel,
                           [e.describe() for e in job.edits], failed=info.numel,
                           diagnosis=cause, note=cause)
    if not job.edits:
        if info.dtype != base_info.dtype:
            return None
        return compare_untouched(job.name, info, data, other)
    if info.dtype not in FLOATING or info.dtype.startswith("F8"):
        raise HarnessError(f"{info.name}: the adapter changes a {info.dtype} tensor")
    merged = tensor_from_bytes(info, data)
    base_tensor = tensor_from_bytes(base_info, other)
    return compare_edited(job.name, merged, base_tensor, job.edits, info.dtype, k,
                          _role(job.edits))


def _role(edits: Sequence[Edit]) -> str:
    """``untouched`` without edits, ``replaced`` for copies and token rows only, else targeted."""
    from harness.deltas import is_replacement

    if not edits:
        return "untouched"
    return "replaced" if all(is_replacement(e) for e in edits) else "targeted"
