"""Hash checks: the merged content digest must differ from the base's.

An adapter that was never applied, or an all-zero adapter, leaves the merged weights identical to
the base: the canonical digests are then equal, which no correct merge of a non-empty adapter
produces.
"""

from __future__ import annotations

from harness.checks.passes import base_scan, merged_scan
from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult, Family
from harness.run.settings import Settings


def check_differs_from_base(ctx: Context) -> CheckResult:
    """The merged digest differs from the base digest, with the tensors that changed."""
    merged = merged_scan(ctx).manifest
    if not ctx.has_base:
        skipped = CheckResult.skipped(
            f"no --base-model given (merged digest {merged.digest[:16]})", needs=["--base-model"]
        )
        skipped.digests = {"merged": merged.digest}
        return skipped
    base = base_scan(ctx).manifest
    digests = {"merged": merged.digest, "base": base.digest}
    if merged.digest == base.digest:
        result = CheckResult.failed(
            "merged weights are identical to the base: the adapter was not applied (or is all"
            f" zeros); digest {merged.digest[:16]}"
        )
    else:
        changed = merged.changed_tensors(base)
        result = CheckResult.passed(
            f"merged digest {merged.digest[:16]} differs from base {base.digest[:16]};"
            f" {len(changed)} of {len(merged.tensors)} tensors changed",
            changed_tensors=len(changed),
        )
    result.digests = digests
    return result


def checks(settings: Settings) -> list[Check]:
    """The hash family (the lock file is a family of its own)."""
    return [
        Check(
            Family.HASH,
            "differs_from_base",
            "merged content digest differs from the base's",
            check_differs_from_base,
            streamed=True,
        )
    ]
