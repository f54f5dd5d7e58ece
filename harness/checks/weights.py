"""The ``weights`` family: pytest items reading one shared oracle pass (see :mod:`harness.oracle`).

* ``adapter_supported``: the adapter's type and config are verifiable (an unknown type fails).
* ``targeted_match_reference``: every tensor the adapter changes is within ``k`` ULP of the exact
  reference (plus the derived slack), with the per-layer weight-difference table.
* ``adapter_applied``: every element the reference moves beyond rounding did change (catches a
  no-op merge even when the delta is too small for the tolerance check).
* ``untouched_identical``: every tensor the adapter does not touch is bit-identical to the base.
* ``modules_to_save``: saved copies and trainable token rows were written.
"""

from __future__ import annotations

from typing import Any

from harness.checks.passes import oracle
from harness.oracle.compare import Role, TensorCheck
from harness.oracle.stream import BOUND_TEXT, OracleResult
from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult, Family, Outcome
from harness.run.settings import Settings

#: Rows of the compact weight-difference table shown in a check's details.
TABLE_ROWS = 8


def _inputs(ctx: Context) -> OracleResult | CheckResult:
    if not ctx.has_adapter:
        return CheckResult.skipped(
            "no --adapter given: nothing to compare the weights with", needs=["--adapter"]
        )
    if not ctx.has_base:
        return CheckResult.skipped(
            "no --base-model given: the weight oracle needs the base", needs=["--base-model"]
        )
    return oracle(ctx)


def _verified(ctx: Context) -> OracleResult | CheckResult:
    """The oracle's result, or the skip or failure every tensor-level check reports first."""
    found = _inputs(ctx)
    if isinstance(found, CheckResult):
        return found
    if found.problem is not None:
        return CheckResult.failed(f"cannot verify the weights: {found.problem}")
    return found


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _index(check: TensorCheck) -> str:
    if check.worst is None:
        return ""
    return "[" + ", ".join(str(i) for i in check.worst.index) + "]"


def _failure_line(check: TensorCheck) -> str:
    worst = check.worst
    where = ""
    if worst is not None:
        where = (
            f"; worst element {_index(check)}: merged {_fmt(worst.merged)}, reference"
            f" {_fmt(worst.reference)}, base {_fmt(worst.base)}, {worst.ulp_error:.3g} ULP"
            f" (allowed {worst.bound_ulps:.3g})"
        )
    return (
        f"{check.name}: {check.failed} of {check.numel} elements outside the bound{where}"
        f" -- diagnosis: {check.diagnosis or 'none'}"
    )


def _relative(check: TensorCheck) -> float:
    return check.error_norm / check.expected_norm if check.expected_norm else 0.0


def _table(checks: list[TensorCheck]) -> list[str]:
    """The compact weight-difference table: failing tensors first, then the largest errors."""
    shown = sorted(checks, key=lambda c: (c.ok, -_relative(c)))[:TABLE_ROWS]
    lines = ["tensor | |R-W| expected | |M-W| found | ratio | |M-R|/|R-W| | max ULP | bound used"]
    for check in shown:
        ratio = f"{check.ratio:.4f}" if check.ratio is not None else "-"
        lines.append(
            f"{check.name} | {check.expected_norm:.4g} | {check.found_norm:.4g} | {ratio} |"
            f" {_relative(check):.3g} | {check.max_ulp:.3g} | {check.bound_use:.2f}"
        )
    if len(checks) > len(shown):
        lines.append(f"... {len(checks) - len(shown)} more in the report's layers table")
    return lines


def _metrics(result: OracleResult) -> dict[str, Any]:
    return {
        "k": result.k,
        "bound": BOUND_TEXT,
        "oracle_seconds": round(result.seconds, 4),
        "bytes_read": result.bytes_read,
    }


#: Share of untouched elements, and of targeted tensors failing almost everywhere, beyond which
#: the base is the wrong one.
FOREIGN_SHARE = 0.5


def foreign_base(found: OracleResult) -> str | None:
    """The run-level cause when most untouched tensors differ from the base (else None).

    A merge changes only what the adapter targets. When most of what it does not touch differs
    from ``--base-model`` (by elements, not one stray layer) *and* most targeted tensors miss
    their reference almost everywhere, the merged model came from another base (another model,
    another revision) and every per-tensor diagnosis is moot. A fault that writes a delta into
    an untouched tensor leaves the targeted ones correct, so it is not mistaken for this.
    """
    untouched = found.by_role(Role.UNTOUCHED)
    modified = [t for t in untouched if t.failed]
    elements = sum(t.numel for t in untouched)
    changed = sum(t.changed for t in untouched)
    targeted = found.by_role(Role.TARGETED)
    missed = [t for t in targeted if t.failed >= 0.9 * t.numel]
    if not modified or changed < FOREIGN_SHARE * elements:
        return None
    if len(missed) < FOREIGN_SHARE * len(targeted):
        return None
    return (
        f"the merge was not made from this base: {len(modified)} of {len(untouched)} tensors"
        " the adapter does not touch differ from it (wrong --base-model, or another revision"
        " of it?)"
    )


def check_supported(ctx: Context) -> CheckResult:
    """The adapter type and config are verifiable; every target maps to a base tensor."""
    found = _inputs(ctx)
    if isinstance(found, CheckResult):
        return found
    if found.problem is not None:
        return CheckResult.failed(found.problem)
    types = ", ".join(sorted({a["peft_type"] for a in found.adapters}))
    edited = [t for t in found.tensors if t.role is not Role.UNTOUCHED]
    kinds = sorted({e.split(" ")[0] for t in edited for e in t.edits})
    return CheckResult.passed(
        f"{types} adapter verifiable: {len(found.by_role(Role.TARGETED))} targeted and"
        f" {len(found.by_role(Role.REPLACED))} replaced tensor(s) ({', '.join(kinds) or 'none'})",
        adapters=found.adapters,
    )


def check_targeted(ctx: Context) -> CheckResult:
    """Every changed tensor is within ``k`` ULP (+ derived slack) of the exact reference."""
    found = _verified(ctx)
    if isinstance(found, CheckResult):
        return found
    targeted = found.by_role(Role.TARGETED)
    if not targeted:
        return CheckResult.skipped("the adapter adds no delta to any tensor (copies only)")
    bound_line = f"bound: {BOUND_TEXT}; k = {found.k:g}"
    failing = [t for t in targeted if t.failed]
    if failing:
        failing.sort(key=lambda t: -(t.worst.ulp_error / t.worst.bound_ulps)
                     if t.worst and t.worst.bound_ulps else 0.0)
        first = failing[0]
        more = f" (and {len(failing) - 1} more tensor(s))" if len(failing) > 1 else ""
        details = [bound_line] + [_failure_line(t) for t in failing[1:6]] + _table(targeted)
        foreign = foreign_base(found)
        headline = f"{foreign}; first: " if foreign is not None else ""
        failed = CheckResult.failed(
            headline + _failure_line(first) + more, details, **_metrics(found)
        )
        failed.layers = found.layers()
        return failed
    use = max(t.bound_use for t in targeted)
    ratios = [t.ratio for t in targeted if t.ratio is not None]
    spread = f"; |M-W|/|R-W| {min(ratios):.4f}..{max(ratios):.4f}" if ratios else ""
    paths: dict[str, int] = {}
    for t in targeted:
        if t.arithmetic:
            paths[t.arithmetic] = paths.get(t.arithmetic, 0) + 1
    recognised = "".join(
        f"; {count} of them by the recognised arithmetic of {path}"
        for path, count in paths.items()
    )
    return CheckResult(
        Outcome.PASSED,
        f"{len(targeted)} targeted tensor(s) match the reference within k={found.k:g} ULP"
        f" (worst element at {use:.2f} of its bound){spread}{recognised}",
        [bound_line, *_table(targeted)],
        _metrics(found),
        layers=found.layers(),
    )


def check_applied(ctx: Context) -> CheckResult:
    """Every element the reference moves beyond rounding differs from the base."""
    found = _verified(ctx)
    if isinstance(found, CheckResult):
        return found
    edited = [t for t in found.tensors if t.role is not Role.UNTOUCHED]
    if not edited:
        return CheckResult.skipped("the adapter changes no tensor")
    stuck = [t for t in edited if t.unchanged]
    changed = sum(t.changed for t in edited)
    total = sum(t.numel for t in edited)
    if stuck:
        stuck.sort(key=lambda t: -t.unchanged / max(t.numel, 1))
        first = stuck[0]
        more = f" (and {len(stuck) - 1} more tensor(s))" if len(stuck) > 1 else ""
        return CheckResult.failed(
            f"{first.name}: {first.unchanged} element(s) that the adapter moves beyond rounding"
            f" still hold the base value ({first.changed} of {first.numel} changed){more} --"
            f" diagnosis: {first.diagnosis or 'none'}",
            [f"{t.name}: {t.unchanged} unchanged, {t.changed}/{t.numel} changed --"
             f" {t.diagnosis}" for t in stuck[:8]],
            unchanged={t.name: t.unchanged for t in stuck},
        )
    below = [t for t in edited if t.note]
    note = (
        f"; {len(below)} tensor(s) with a delta below the stored precision" if below else ""
    )
    if not changed:
        return CheckResult.passed(
            "the adapter's delta is below the stored precision everywhere: a correct merge"
            " equals the base" + note
        )
    return CheckResult.passed(
        f"every element the adapter moves beyond half an ULP changed ({changed} of {total}"
        f" elements in {len(edited)} tensor(s)){note}",
        changed=changed,
        elements=total,
    )


def check_untouched(ctx: Context) -> CheckResult:
    """Every tensor the adapter does not touch is bit-identical to the base."""
    found = _verified(ctx)
    if isinstance(found, CheckResult):
        return found
    untouched = found.by_role(Role.UNTOUCHED)
    modified = [t for t in untouched if t.failed]
    foreign = foreign_base(found)
    if foreign is not None:
        return CheckResult.failed(
            foreign,
            [f"{t.name}: {t.changed} of {t.numel} elements differ" for t in modified[:8]],
            modified=[t.name for t in modified],
        )
    if modified:
        first = modified[0]
        more = f" (and {len(modified) - 1} more tensor(s))" if len(modified) > 1 else ""
        worst = first.worst
        value = (
            f"; element {_index(first)}: merged {_fmt(worst.merged)}, base {_fmt(worst.base)}"
            if worst
            else ""
        )
        return CheckResult.failed(
            f"{first.name}: {first.changed} of {first.numel} elements differ from the base"
            f" although the adapter does not touch it{value}{more} -- diagnosis:"
            f" {first.diagnosis or 'none'}",
            [f"{t.name}: {t.changed} elements differ -- {t.diagnosis}" for t in modified[:8]],
            modified=[t.name for t in modified],
        )
    return CheckResult.passed(f"{len(untouched)} untouched tensor(s) bit-identical to the base")


def check_copies(ctx: Context) -> CheckResult:
    """``modules_to_save`` copies and trainable token rows are written, exactly."""
    found = _verified(ctx)
    if isinstance(found, CheckResult):
        return found
    replaced = found.by_role(Role.REPLACED)
    if not replaced:
        return CheckResult.skipped("the adapter has no modules_to_save copies or trainable tokens")
    bad = [t for t in replaced if not t.ok]
    if bad:
        first = bad[0]
        what = (
            f"{first.failed} of {first.numel} elements differ from the saved copy"
            if first.failed
            else f"{first.unchanged} elements still hold the base values"
        )
        return CheckResult.failed(
            f"{first.name}: {what} -- diagnosis: {first.diagnosis or 'none'}",
            [f"{t.name}: {t.failed} off, {t.unchanged} unchanged -- {t.diagnosis}" for t in bad],
        )
    names = ", ".join(t.name for t in replaced[:4])
    more = f" and {len(replaced) - 4} more" if len(replaced) > 4 else ""
    return CheckResult.passed(f"saved copies written exactly: {names}{more}")


def checks(settings: Settings) -> list[Check]:
    """The weights family."""
    spec = [
        ("adapter_supported", check_supported, "the adapter type and config are verifiable"),
        ("targeted_match_reference", check_targeted,
         "changed tensors within k ULP of the exact reference"),
        ("adapter_applied", check_applied,
         "every element the adapter moves beyond rounding changed"),
        ("untouched_identical", check_untouched, "untouched tensors bit-identical to the base"),
        ("modules_to_save", check_copies, "modules_to_save copies and token rows written"),
    ]
    return [
        Check(Family.WEIGHTS, name, doc, run,
              frozenset({"adapter"}) if name == "adapter_supported" else frozenset(),
              streamed=True)
        for name, run, doc in spec
    ]
