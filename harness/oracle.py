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

import concurrent.futures
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.checkpoint import Checkpoint, TensorInfo, tensor_from_bytes
from harness.dtypes import FLOATING
from harness.errors import HarnessError
from harness.hashing import Manifest, combine, hash_tensor_stream
from harness.scan import NonFinite, ScanResult, find_nonfinite

if TYPE_CHECKING:
    import torch

    from harness.adapter import Adapter
    from harness.deltas import Edit, Plan

#: Elements per row block of the reference computation (fits the CPU caches, keeps RAM flat).
BLOCK_ELEMENTS = 1 << 19
#: The printed form of the bound.
BOUND_TEXT = (
    "|M-R| <= k*ulp(|R|+S) + S, S = 1.5*ulp(delta) + (γ_r(u32)+γ_r(u_c))*|s|*||B_i||*||A_j||"
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
    #: Elements the reference moves beyond rounding, and how many of those are unchanged.
    required: int = 0
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


# ---- streaming --------------------------------------------------------------------------


def _pairs(
    merged: Checkpoint, base: Checkpoint, sources: dict[str, str], depth: int = 2
) -> Iterator[tuple[TensorInfo, bytearray, bytearray | None]]:
    """Yield (merged info, merged bytes, base bytes) in merged file order, read ahead on a thread.

    ``sources`` maps a merged tensor to the base tensor it is compared with.
    """
    items = merged.in_file_order()
    slots: queue.Queue[Any] = queue.Queue(depth)
    stop = threading.Event()

    def read() -> None:
        try:
            for info in items:
                if stop.is_set():
                    return
                source = sources.get(info.name)
                data = merged.read_bytes(info.name)
                other = base.read_bytes(source) if source is not None else None
                slots.put((info, data, other))
        except BaseException as exc:  # handed to the consumer, re-raised there
            slots.put(exc)
            return
        slots.put(None)

    thread = threading.Thread(target=read, name="merge-harness-oracle-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def _scan_one(info: TensorInfo, data: bytearray) -> tuple[str, NonFinite | None]:
    return hash_tensor_stream(info, data), find_nonfinite(info, data)


# ---- comparison -------------------------------------------------------------------------


def _reference(
    w: torch.Tensor, edits: Sequence[Edit], rows: slice, code: str, k: float
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


def reference_tensor(
    w: torch.Tensor, edits: Sequence[Edit], code: str, k: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, S)`` of a whole tensor (``w`` in the compute dtype); used by the diagnosis."""
    return _reference(w, edits, slice(None), code, k)


class _Accumulator:
    """Per-tensor statistics gathered block by block."""

    def __init__(self, check: TensorCheck) -> None:
        self.check = check
        self.squares = [0.0, 0.0, 0.0]
        self.best_ratio = -1.0

    def block(
        self,
        start: int,
        m: torch.Tensor,
        w: torch.Tensor,
        r: torch.Tensor,
        s: torch.Tensor,
        code: str,
        k: float,
        shape: tuple[int, ...],
    ) -> None:
        import torch

        from harness.ulp import ulp

        check = self.check
        ulp_r = ulp(r, code)
        err = (m - r).abs()
        bound = ulp(r.abs() + s, code).mul_(k).add_(s)
        inside = err <= bound
        check.failed += int(inside.numel() - int(inside.sum()))
        ulps = err / ulp_r
        finite = torch.nan_to_num(ulps, nan=math.inf)
        check.max_ulp = max(check.max_ulp, float(finite.max()) if finite.numel() else 0.0)
        ratio = torch.nan_to_num(err / bound.clamp_min(torch.finfo(bound.dtype).tiny), nan=math.inf)
        flat = int(torch.argmax(ratio)) if ratio.numel() else 0
        if ratio.numel() and float(ratio.reshape(-1)[flat]) > self.best_ratio:
            self.best_ratio = float(ratio.reshape(-1)[flat])
            index = _unravel(start + flat, shape)
            check.worst = Worst(
                index,
                float(m.reshape(-1)[flat]),
                float(r.reshape(-1)[flat]),
                float(w.reshape(-1)[flat]),
                float(ulps.reshape(-1)[flat]),
                float(bound.reshape(-1)[flat] / ulp_r.reshape(-1)[flat]),
            )
        moved = r - w
        required = moved.abs() > ulp(w, code).mul_(0.5).add_(s)
        same = m == w
        check.required += int(required.sum())
        check.unchanged += int((required & same).sum())
        check.changed += int(same.numel() - int(same.sum()))
        for slot, diff in enumerate((moved, m - w, m - r)):
            self.squares[slot] += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2

    def finish(self) -> None:
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
    """Compare one merged tensor with its reference, row block by row block."""
    from harness.ulp import compute_dtype

    cd = compute_dtype(code)
    check = TensorCheck(name, role, code, merged.numel(), [e.describe() for e in edits])
    acc = _Accumulator(check)
    shape = tuple(merged.shape)
    rows = shape[0] if shape else 1
    per_row = merged.numel() // rows if rows else 0
    step = rows
    if all(e.blockable for e in edits) and per_row:
        step = max(1, BLOCK_ELEMENTS // per_row)
    m_all, w_all = (merged, base) if shape else (merged.reshape(1), base.reshape(1))
    for start in range(0, rows, step):
        block = slice(start, min(rows, start + step))
        w = w_all[block].to(cd)
        r, s = _reference(w, edits, block, code, k)
        acc.block(start * per_row, m_all[block].to(cd), w, r, s, code, k, shape or (1,))
    acc.finish()
    if check.required == 0 and check.expected_norm > 0:
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


def run_oracle(
    merged: Checkpoint,
    base: Checkpoint,
    adapters: Sequence[Adapter],
    k: float = 1.0,
    *,
    scans: bool = True,
) -> tuple[OracleResult, ScanResult | None, ScanResult | None]:
    """Stream ``merged`` against ``base`` + ``adapters``; return the verdicts and both scans.

    Raises :class:`HarnessError` only when a checkpoint cannot be read; adapter problems
    (unsupported type, invalid config, modules matching nothing) are recorded in
    ``result.problem`` so the untouched tensors and digests are still computed.
    """
    from harness.deltas import Target, plan_adapters
    from harness.diagnosis import diagnose

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
    merged_digests: dict[str, str] = {}
    base_digests: dict[str, str] = {}
    merged_bad: dict[str, NonFinite] = {}
    base_bad: dict[str, NonFinite] = {}
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="merge-harness-hash")
    pending: list[tuple[dict[str, str], dict[str, NonFinite], str, Any]] = []

    def drain(keep: int) -> None:
        while len(pending) > keep:
            digests, bad, name, future = pending.pop(0)
            digest, nonfinite = future.result()
            digests[name] = digest
            if nonfinite is not None:
                bad[name] = nonfinite

    try:
        for info, data, other in _pairs(merged, base, sources):
            result.bytes_read += len(data) + (len(other) if other is not None else 0)
            if scans:
                pending.append((merged_digests, merged_bad, info.name,
                                pool.submit(_scan_one, info, data)))
                source = sources.get(info.name)
                if other is not None and source == info.name:
                    pending.append((base_digests, base_bad, info.name,
                                    pool.submit(_scan_one, base.tensors[info.name], other)))
            if other is not None and problem is None:
                for job in work[info.name]:
                    check = _check_one(job, info, data, other, base.tensors[job.base], k)
                    if check is not None:
                        if not check.ok and plan is not None:
                            check.diagnosis = diagnose(check, job.edits, plan, info, data,
                                                       base.tensors[job.base], other, k)
                        result.tensors.append(check)
                for job in work[info.name]:
                    for edit in job.edits:
                        edit.release()
            drain(2)
        if scans:
            for name in base.tensors:
                if name not in base_digests and not any(p[2] == name and p[0] is base_digests
                                                        for p in pending):
                    data = base.read_bytes(name)
                    result.bytes_read += len(data)
                    pending.append((base_digests, base_bad, name,
                                    pool.submit(_scan_one, base.tensors[name], data)))
                    drain(2)
        drain(0)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if plan is not None:
            plan.release()
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
    from harness.deltas import is_replacement

    if info.shape != base_info.shape:
        # reported by the structure checks; values cannot be compared element by element
        return TensorCheck(job.name, "untouched" if not job.edits else "targeted",
                           info.dtype, info.numel, note="shape differs from the base")
    if not job.edits:
        if info.dtype != base_info.dtype:
            return None
        return compare_untouched(job.name, info, data, other)
    if info.dtype not in FLOATING or info.dtype.startswith("F8"):
        raise HarnessError(f"{info.name}: the adapter changes a {info.dtype} tensor")
    merged = tensor_from_bytes(info, data)
    base_tensor = tensor_from_bytes(base_info, other)
    role = "replaced" if all(is_replacement(e) for e in job.edits) else "targeted"
    return compare_edited(job.name, merged, base_tensor, job.edits, info.dtype, k, role)
