"""One part of the streamed pass as data: what it covered and found, to JSON and back, combined.

A part (``stream.partition``) is computed by one xdist worker or one CI job. Its
:class:`PartResult` holds every per-tensor verdict and digest of its tensors, so that the
parts of one plan combine into exactly what one process computes over the whole checkpoint:
the same per-tensor verdicts in file order, the same canonical digests (recomputed from the
per-tensor digests) and the same NaN/Inf findings. :func:`combine_parts` refuses parts that do
not form one complete plan, each with a one-line cause.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError
from harness.oracle.compare import Role, TensorCheck, Worst
from harness.oracle.stream import OracleResult
from harness.stream.hashing import Manifest, combine
from harness.stream.partition import Part
from harness.stream.scan import NonFinite, ScanResult


def _num(value: float) -> float | str:
    """A float as strict JSON: NaN and infinities as strings (finite values round-trip)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _float(value: Any) -> float:
    """Inverse of :func:`_num`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def worst_to_json(worst: Worst) -> dict[str, Any]:
    """A :class:`Worst` as strict JSON."""
    return {f.name: (list(v) if f.name == "index" else _num(v))
            for f in dataclasses.fields(Worst) for v in [getattr(worst, f.name)]}


def worst_from_json(data: Mapping[str, Any]) -> Worst:
    """Inverse of :func:`worst_to_json`."""
    values = {f.name: data[f.name] for f in dataclasses.fields(Worst)}
    index = tuple(int(i) for i in values.pop("index"))
    return Worst(index, **{k: _float(v) for k, v in values.items()})


def check_to_json(check: TensorCheck) -> dict[str, Any]:
    """A :class:`TensorCheck` as strict JSON, every field (new fields travel without edits)."""
    data: dict[str, Any] = {}
    for spec in dataclasses.fields(TensorCheck):
        value = getattr(check, spec.name)
        if isinstance(value, Role):
            data[spec.name] = value.value
        elif isinstance(value, Worst):
            data[spec.name] = worst_to_json(value)
        elif isinstance(value, float):
            data[spec.name] = _num(value)
        else:
            data[spec.name] = list(value) if isinstance(value, (list, tuple)) else value
    return data


def check_from_json(data: Mapping[str, Any]) -> TensorCheck:
    """Inverse of :func:`check_to_json`."""
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(TensorCheck):
        if spec.name not in data:
            continue
        value = data[spec.name]
        if spec.name == "role":
            value = Role(value)
        elif spec.name == "worst":
            value = None if value is None else worst_from_json(value)
        elif isinstance(spec.default, float):
            value = _float(value)
        elif isinstance(spec.default, int) and not isinstance(spec.default, bool):
            value = int(value)
        values[spec.name] = value
    return TensorCheck(**values)


def _nonfinite_to_json(found: Mapping[str, NonFinite]) -> dict[str, Any]:
    return {
        name: {"nan": v.nan, "inf": v.inf, "first_index": v.first_index,
               "first_value": _num(v.first_value)}
        for name, v in sorted(found.items())
    }


def _nonfinite_from_json(data: Mapping[str, Any]) -> dict[str, NonFinite]:
    return {
        str(name): NonFinite(int(v["nan"]), int(v["inf"]), int(v["first_index"]),
                             _float(v["first_value"]))
        for name, v in data.items()
    }


def plan_digest(parts: Sequence[Part]) -> str:
    """A digest of a whole partition: every part's index and tensor names."""
    outer = hashlib.sha256(b"merge-harness plan\n")
    for part in sorted(parts, key=lambda p: p.index):
        outer.update(f"{part.index}/{part.count}\n".encode())
        for name in sorted(part.names):
            outer.update(b"m\t" + name.encode("utf-8", "surrogateescape") + b"\n")
        for name in sorted(part.base_names):
            outer.update(b"b\t" + name.encode("utf-8", "surrogateescape") + b"\n")
    return outer.hexdigest()


@dataclass
class PartResult:
    """What one part of the pass covered and found."""

    index: int
    count: int
    #: :func:`plan_digest` of the partition this part belongs to.
    plan: str
    #: Merged tensors this part read (file order), and base-only tensors it digested.
    names: list[str]
    base_names: list[str]
    #: Whether the oracle ran (base and adapter given); otherwise digests and scans only.
    oracle: bool
    problem: str | None = None
    adapters: list[dict[str, str]] = field(default_factory=list)
    k: float = 1.0
    tensors: list[TensorCheck] = field(default_factory=list)
    #: Targeted tensors absent from the merged checkpoint (part 1 carries them).
    missing: list[TensorCheck] = field(default_factory=list)
    merged_digests: dict[str, str] = field(default_factory=dict)
    merged_nonfinite: dict[str, NonFinite] = field(default_factory=dict)
    #: None when the run has no base.
    base_digests: dict[str, str] | None = None
    base_nonfinite: dict[str, NonFinite] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def label(self) -> str:
        """``2/4``."""
        return f"{self.index}/{self.count}"

    def to_json(self) -> dict[str, Any]:
        """Strict JSON (what a partial report carries and xdist workers exchange)."""
        return {
            "index": self.index,
            "count": self.count,
            "plan": self.plan,
            "names": list(self.names),
            "base_names": list(self.base_names),
            "oracle": self.oracle,
            "problem": self.problem,
            "adapters": [dict(a) for a in self.adapters],
            "k": _num(self.k),
            "tensors": [check_to_json(t) for t in self.tensors],
            "missing": [check_to_json(t) for t in self.missing],
            "merged_digests": dict(sorted(self.merged_digests.items())),
            "merged_nonfinite": _nonfinite_to_json(self.merged_nonfinite),
            "base_digests": (
                None if self.base_digests is None else dict(sorted(self.base_digests.items()))
            ),
            "base_nonfinite": _nonfinite_to_json(self.base_nonfinite),
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 4),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PartResult:
        """Inverse of :meth:`to_json`; a HarnessError naming the first malformed field."""
        try:
            base = data["base_digests"]
            part = cls(
                index=int(data["index"]),
                count=int(data["count"]),
                plan=str(data["plan"]),
                names=[str(n) for n in data["names"]],
                base_names=[str(n) for n in data["base_names"]],
                oracle=bool(data["oracle"]),
                problem=None if data["problem"] is None else str(data["problem"]),
                adapters=[{str(k): str(v) for k, v in a.items()} for a in data["adapters"]],
                k=_float(data["k"]),
                tensors=[check_from_json(t) for t in data["tensors"]],
                missing=[check_from_json(t) for t in data["missing"]],
                merged_digests={str(k): str(v) for k, v in data["merged_digests"].items()},
                merged_nonfinite=_nonfinite_from_json(data["merged_nonfinite"]),
                base_digests=None if base is None else {str(k): str(v) for k, v in base.items()},
                base_nonfinite=_nonfinite_from_json(data["base_nonfinite"]),
                bytes_read=int(data["bytes_read"]),
                seconds=_float(data["seconds"]),
            )
        except KeyError as exc:
            raise HarnessError(f"no {exc.args[0]!r} field") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise HarnessError(f"a malformed field ({exc})") from None
        if not 1 <= part.index <= part.count:
            raise HarnessError(f"part {part.label} does not exist")
        return part


@dataclass
class Combined:
    """The parts put together: what one process would have computed over the whole pass."""

    oracle: OracleResult | None
    merged: ScanResult
    base: ScanResult | None
    #: Tensors each part read (by part label), for the report.
    parts: dict[str, int] = field(default_factory=dict)


def _indexed(parts: Sequence[tuple[str, PartResult]]) -> list[PartResult]:
    """The parts in index order after checking they are exactly parts 1..N of one plan."""
    if not parts:
        raise HarnessError("no parts to combine")
    source, first = parts[0]
    by_index: dict[int, str] = {}
    for name, part in parts:
        if part.count != first.count:
            raise HarnessError(
                f"{name} is part {part.label} but {source} is part {first.label}: parts of"
                " different splits"
            )
        if part.index in by_index:
            raise HarnessError(f"part {part.label} given twice ({by_index[part.index]}, {name})")
        by_index[part.index] = name
        if part.plan != first.plan:
            raise HarnessError(
                f"{name} (part {part.label}) was cut from other inputs than {source}: its"
                " tensors do not belong to the same plan"
            )
    absent = [i for i in range(1, first.count + 1) if i not in by_index]
    if absent:
        have = ", ".join(str(i) for i in sorted(by_index))
        return_text = ", ".join(f"{i}/{first.count}" for i in absent)
        raise HarnessError(f"part {return_text} missing (have {have} of {first.count})")
    ordered = sorted((p for _, p in parts), key=lambda p: p.index)
    for name, part in parts:
        if (part.oracle, part.k, part.problem, part.adapters) != (
            first.oracle, first.k, first.problem, first.adapters
        ):
            raise HarnessError(f"{name} (part {part.label}) judged other adapters or tolerances")
        if (part.base_digests is None) != (first.base_digests is None):
            raise HarnessError(f"{name} (part {part.label}) ran with another base")
    return ordered


def _claim(owner: dict[str, str], names: Sequence[str], label: str, what: str) -> None:
    for name in names:
        if name in owner:
            raise HarnessError(
                f"{what} tensor {name!r} covered twice (parts {owner[name]}, {label})"
            )
        owner[name] = label


def combine_parts(parts: Sequence[tuple[str, PartResult]]) -> Combined:
    """Put ``(source, part)`` pairs together; a HarnessError when they are not one whole plan.

    Refused, each with its one-line cause: no parts, parts of different splits or plans, a part
    given twice or missing, a tensor covered twice or by no part, parts that judged other
    adapters. Per-tensor verdicts are concatenated in part order (parts are contiguous runs in
    file order, so this is file order), part 1's missing tensors last, as one process does.
    """
    ordered = _indexed(parts)
    merged_owner: dict[str, str] = {}
    base_owner: dict[str, str] = {}
    for part in ordered:
        _claim(merged_owner, part.names, part.label, "merged")
        _claim(base_owner, part.base_names, part.label, "base")
    rebuilt = plan_digest([
        Part(p.index, p.count, frozenset(p.names), frozenset(p.base_names), 0) for p in ordered
    ])
    if rebuilt != ordered[0].plan:
        raise HarnessError(
            "the parts do not cover the plan they were cut from (a tensor covered by no part,"
            " or a part edited)"
        )
    for part in ordered:
        stray = set(part.merged_digests) - set(part.names)
        if stray:
            raise HarnessError(f"part {part.label} holds digests of tensors it did not read")
    first = ordered[0]
    merged_digests = {k: v for p in ordered for k, v in p.merged_digests.items()}
    merged = ScanResult(
        Manifest(combine(merged_digests), merged_digests, {}),
        {k: v for p in ordered for k, v in p.merged_nonfinite.items()},
    )
    base: ScanResult | None = None
    if first.base_digests is not None:
        base_digests = {k: v for p in ordered for k, v in (p.base_digests or {}).items()}
        base = ScanResult(
            Manifest(combine(base_digests), base_digests, {}),
            {k: v for p in ordered for k, v in p.base_nonfinite.items()},
        )
    oracle: OracleResult | None = None
    if first.oracle:
        oracle = OracleResult(
            [dict(a) for a in first.adapters],
            first.problem,
            [t for p in ordered for t in p.tensors] + [t for p in ordered for t in p.missing],
            first.k,
            seconds=sum(p.seconds for p in ordered),
            bytes_read=sum(p.bytes_read for p in ordered),
        )
    return Combined(oracle, merged, base, {p.label: len(p.names) for p in ordered})
