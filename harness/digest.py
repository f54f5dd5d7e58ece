"""Hash checks: the merged content digest must differ from the base's.

An adapter that was never applied, or an all-zero adapter, leaves the merged weights identical to
the base: the canonical digests are then equal, which no correct merge of a non-empty adapter
produces.
"""

from __future__ import annotations

from harness.context import Context, Options
from harness.result import Check, CheckResult, Kind
from harness.structure import base_scan, merged_scan


def check_differs_from_base(ctx: Context) -> CheckResult:
    """The merged digest differs from the base digest, with the tensors that changed."""
    merged = merged_scan(ctx).manifest
    if not ctx.has_base:
        return CheckResult.skipped(f"no --base-model given (merged digest {merged.digest[:16]})")
    base = base_scan(ctx).manifest
    figures = {"merged_digest": merged.digest, "base_digest": base.digest}
    if merged.digest == base.digest:
        return CheckResult.failed(
            "merged weights are identical to the base: the adapter was not applied (or is all"
            f" zeros); digest {merged.digest[:16]}",
            metrics=figures,
        )
    changed = merged.changed_tensors(base)
    return CheckResult.passed(
        f"merged digest {merged.digest[:16]} differs from base {base.digest[:16]};"
        f" {len(changed)} of {len(merged.tensors)} tensors changed",
        changed_tensors=len(changed),
        **figures,
    )


def checks(options: Options) -> list[Check]:
    """The hash family (the lock file transitions live in ``harness.gate``)."""
    return [
        Check(
            "hash",
            "differs_from_base",
            Kind.HASH,
            "merged content digest differs from the base's",
            check_differs_from_base,
        )
    ]
