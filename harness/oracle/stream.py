"""The oracle's streamed pass: every merged tensor with its base counterpart, once, in file order.

A reader thread stays ahead of the arithmetic (``stream.pipeline``); workers compare tensors
(``oracle.compare``) and, on the same bytes, compute the canonical digests and NaN/Inf scans of
both checkpoints, so the pass also yields what the structure and hash checks need.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.deltas import Plan, Target, is_replacement, plan_adapters
from harness.deltas.growth import Growths, explain_growth, grow
from harness.dtypes import FLOATING
from harness.errors import HarnessError
from harness.io.checkpoint import Checkpoint
from harness.io.safetensors import TensorInfo, tensor_from_bytes
from harness.oracle.bases import diagnose_base
from harness.oracle.compare import Role, TensorCheck, compare_judged, compare_untouched
from harness.oracle.diagnosis import diagnose
from harness.oracle.partial import regroup_experts
from harness.stream.hashing import Manifest, combine
from harness.stream.partition import Part, Unit, units
from harness.stream.pipeline import StreamPass
from harness.stream.scan import NonFinite, ScanResult, scan_tensor

if TYPE_CHECKING:
    from harness.deltas.base import Edit
    from harness.io.adapter import Adapter

#: The printed form of the bound.
BOUND_TEXT = (
    "|M-R| <= k*ulp(|R|+S) + S, S = 1.5*ulp(delta) + (γ_r(u32)+γ_(r+1)(u_c))*|s|*||B_i||*||A_j||"
    " + 2*u_c*(|W|+|delta|) per LoRA step (DoRA, IA3, LoHa, LoKr: their own S)"
)


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

    def by_role(self, role: Role) -> list[TensorCheck]:
        """The tensors of one role, in file order."""
        return [t for t in self.tensors if t.role is role]

    def layers(self) -> list[dict[str, Any]]:
        """The per-layer weight-difference table: every targeted or replaced tensor."""
        return [t.layer_row() for t in self.tensors if t.role is not Role.UNTOUCHED]


@dataclass
class _Work:
    """What to do with one merged tensor: compare with a base tensor under some edits."""

    name: str
    base: str
    edits: list[Edit]


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


def role_of(edits: Sequence[Edit]) -> Role:
    """``untouched`` without edits, ``replaced`` for copies and token rows only, else targeted."""
    if not edits:
        return Role.UNTOUCHED
    return Role.REPLACED if all(is_replacement(e) for e in edits) else Role.TARGETED


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
            name, role_of(edits), info.dtype, info.numel, [e.describe() for e in edits],
            failed=info.numel, diagnosis="the tensor is missing from the merged checkpoint",
        ))
    return missing


def _check_one(
    job: _Work,
    info: TensorInfo,
    data: bytearray,
    other: bytearray,
    base_info: TensorInfo,
    k: float,
    unexplained: str | None = None,
) -> TensorCheck | None:
    """Compare one merged tensor (or the virtual tied head) with its base tensor and edits."""
    if info.shape != base_info.shape:
        # values cannot be compared element by element: a failure, never a silent pass
        cause = unexplained or (
            f"shape {list(info.shape)} differs from the base's {list(base_info.shape)}"
        )
        return TensorCheck(job.name, role_of(job.edits), info.dtype, info.numel,
                           [e.describe() for e in job.edits], failed=info.numel,
                           changed=info.numel, diagnosis=cause, note=cause)
    if not job.edits:
        if info.dtype != base_info.dtype:
            return None
        return compare_untouched(job.name, info, data, other)
    if info.dtype not in FLOATING or info.dtype.startswith("F8"):
        raise HarnessError(
            f"{info.file}: tensor {info.name!r} is {info.dtype}, which the adapter cannot change"
        )
    merged = tensor_from_bytes(info, data)
    base_tensor = tensor_from_bytes(base_info, other)
    return compare_judged(job.name, merged, base_tensor, job.edits, info.dtype, k,
                          role_of(job.edits))


def _grown(info: TensorInfo, data: bytearray, rows: int) -> tuple[TensorInfo, bytearray]:
    """The base tensor with zero rows appended up to ``rows`` (a grown vocabulary).

    The appended rows never reach a verdict as zeros: an edit that explains the growth (a full
    copy, or trainable token rows covering them) replaces them in the reference.
    """
    row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
    extra = bytearray(row_bytes * (rows - info.shape[0]))
    grown = dataclasses.replace(info, shape=(rows, *info.shape[1:]),
                                end=info.start + len(data) + len(extra))
    return grown, data + extra


#: One read item: a merged tensor's header and bytes, and its base counterpart's bytes.
_Item = tuple[TensorInfo, bytearray, bytearray | None]


class OraclePass:
    """One streamed pass of the oracle: plan, compare, digest; see :func:`run_oracle`."""

    def __init__(
        self,
        merged: Checkpoint,
        base: Checkpoint,
        adapters: Sequence[Adapter],
        k: float,
        *,
        scans: bool,
        workers: int | None,
    ) -> None:
        self.merged, self.base, self.k, self.scans = merged, base, k, scans
        self.problem: str | None = None
        self.plan: Plan | None = None
        self.growths = Growths()
        try:
            self.plan = plan_adapters(list(adapters), Target(base.tensors, base.config or {}))
            self.growths = explain_growth(self.plan, merged.tensors)
            grow(self.plan, self.growths)
        except HarnessError as exc:
            self.problem = str(exc)
        self.work = _work_list(merged, base, self.plan)
        self.sources = {name: jobs[0].base for name, jobs in self.work.items()}
        largest = max((self.size(info) for info in merged.tensors.values()), default=0)
        self.stream = StreamPass(largest, headroom=1.5, pool_share=0.25, workers=workers)

    def size(self, info: TensorInfo) -> int:
        """Bytes one merged tensor holds in flight: its own and its base counterpart's."""
        source = self.sources.get(info.name)
        return info.nbytes + (self.base.tensors[source].nbytes if source is not None else 0)

    def read(self, info: TensorInfo) -> _Item:
        """Both tensors' bytes, in pooled buffers (on the reader thread)."""
        pool = self.stream.pool
        source = self.sources.get(info.name)
        other = self.base.read_into(source, pool) if source is not None else None
        return info, self.merged.read_into(info.name, pool), other

    def process(self, item: _Item) -> _Done:
        """Examine one tensor on a worker thread; its buffers go back to the pool after."""
        info, data, other = item
        try:
            return self.examine(info, data, other)
        finally:
            self.stream.pool.put(data)
            if other is not None:
                self.stream.pool.put(other)

    def examine(self, info: TensorInfo, data: bytearray, other: bytearray | None) -> _Done:
        """Digests, NaN/Inf scans and the comparisons of one merged tensor."""
        done = _Done(info.name, nbytes=len(data) + (len(other) if other is not None else 0))
        if self.scans:
            done.digest, done.nonfinite = scan_tensor(info, data)
            if other is not None and self.sources.get(info.name) == info.name:
                done.base_name = info.name
                done.base_digest, done.base_nonfinite = scan_tensor(
                    self.base.tensors[info.name], other
                )
        plan = self.plan
        if other is None or self.problem is not None or plan is None:
            return done
        jobs = self.work[info.name]
        try:
            for job in jobs:
                base_info, base_data = self.base.tensors[job.base], other
                growth = self.growths.explained.get(info.name)
                if growth is not None and job.edits:
                    base_info, base_data = _grown(base_info, other, growth.rows)
                check = _check_one(job, info, data, base_data, base_info, self.k,
                                   self.growths.unexplained.get(info.name))
                if check is None:
                    continue
                if not check.ok and check.diagnosis is None:
                    check.diagnosis = diagnose(
                        check, job.edits, plan, info, data, base_info, base_data, self.k
                    )
                done.checks.append(check)
        finally:
            for job in jobs:
                for edit in job.edits:
                    edit.release()
        return done

    def base_only(self) -> list[TensorInfo]:
        """Base tensors the merged pass does not read (only their digests are needed)."""
        seen = {source for name, source in self.sources.items() if source == name}
        return [info for info in self.base.in_file_order() if info.name not in seen]

    def units(self) -> tuple[list[Unit], list[Unit]]:
        """The pass as partition units: merged tensors (with their base bytes) and base-only."""
        merged = units((i.name, i.file.name, self.size(i)) for i in self.merged.in_file_order())
        rest = units((i.name, i.file.name, i.nbytes) for i in self.base_only())
        return merged, rest

    def missing(self) -> list[TensorCheck]:
        """Failures for the tensors the adapter changes that the merged checkpoint lacks."""
        if self.plan is None or self.problem is not None:
            return []
        return _missing(self.merged, self.base, self.plan, self.work)

    def finish(self, result: OracleResult) -> None:
        """Judge what needs every tensor's verdict: experts regrouped, a wrong base named.

        Runs after the whole pass (or after its parts are combined); it re-reads at most a
        few tensors of both checkpoints, and only when tensors failed.
        """
        if self.plan is None or self.problem is not None:
            return
        regroup_experts(result.tensors, self.plan)
        cause = diagnose_base(result.tensors, self.plan, self.merged, self.base, self.k)
        if cause is not None:
            result.notes.append(cause)

    def run(
        self, part: Part | None = None
    ) -> tuple[OracleResult, ScanResult | None, ScanResult | None]:
        """The pass itself (or one ``part`` of it); see :func:`run_oracle`.

        A part's result holds its tensors only; the missing-tensor verdicts, which need no
        bytes, are :meth:`missing` (the part that carries them asks for them).
        """
        started = time.perf_counter()
        result = OracleResult([], self.problem, [], self.k)
        digests: tuple[dict[str, str], dict[str, str]] = ({}, {})
        bad: tuple[dict[str, NonFinite], dict[str, NonFinite]] = ({}, {})
        try:
            order = [i for i in self.merged.in_file_order() if part is None or i.name in part.names]
            for done in self.stream.run(order, self.read, self.process, self.size):
                self.stream.budget.release(done.nbytes)
                result.bytes_read += done.nbytes
                result.tensors.extend(done.checks)
                if done.digest is not None:
                    digests[0][done.name] = done.digest
                if done.nonfinite is not None:
                    bad[0][done.name] = done.nonfinite
                if done.base_name is not None and done.base_digest is not None:
                    digests[1][done.base_name] = done.base_digest
                if done.base_name is not None and done.base_nonfinite is not None:
                    bad[1][done.base_name] = done.base_nonfinite
            if self.scans:
                for info in self.base_only():
                    if part is not None and info.name not in part.base_names:
                        continue
                    data = self.base.read_bytes(info.name)
                    result.bytes_read += len(data)
                    digests[1][info.name], found = scan_tensor(info, data)
                    if found is not None:
                        bad[1][info.name] = found
        finally:
            if self.plan is not None:
                self.plan.release()
        if part is None:
            result.tensors.extend(self.missing())
            self.finish(result)
        result.seconds = time.perf_counter() - started
        if not self.scans:
            return result, None, None
        merged_scan = ScanResult(Manifest(combine(digests[0]), digests[0], {}), bad[0])
        base_scan = ScanResult(Manifest(combine(digests[1]), digests[1], {}), bad[1])
        return result, merged_scan, base_scan


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
    oracle = OraclePass(merged, base, adapters, k, scans=scans, workers=workers)
    result, merged_scan, base_scan = oracle.run()
    result.adapters = [{"path": str(a.root), "peft_type": a.peft_type} for a in adapters]
    return result, merged_scan, base_scan
