"""The streamed passes several families share: one read of the bytes serves them all.

The weight oracle's pass computes both checkpoints' digests and NaN/Inf scans on the bytes it
reads anyway. :func:`scans` therefore runs the oracle when the weights family will run it
regardless, and a plain scan otherwise: one explicit decision, in one place, instead of a
structure check reaching sideways into the weights family.
"""

from __future__ import annotations

import contextlib

from harness.deltas import Target, plan_adapters
from harness.deltas.growth import Growths, explain_growth
from harness.errors import HarnessError
from harness.oracle.stream import OracleResult, run_oracle
from harness.run.context import Context, Key
from harness.run.result import Family
from harness.stream.scan import ScanResult, scan_checkpoint

ORACLE: Key[OracleResult] = Key("pass:oracle")
MERGED_SCAN: Key[ScanResult] = Key("pass:scan:merged")
BASE_SCAN: Key[ScanResult] = Key("pass:scan:base")
GROWTH: Key[Growths] = Key("pass:growth")


def oracle_runs(ctx: Context) -> bool:
    """Whether the weights family will run the oracle (base and adapter given, selected)."""
    return ctx.has_base and ctx.has_adapter and ctx.settings.runs(Family.WEIGHTS)


def oracle(ctx: Context) -> OracleResult:
    """The memoised oracle pass of this run; it also records both checkpoints' scans."""

    def compute() -> OracleResult:
        result, merged_scan, base_scan = run_oracle(
            ctx.merged(), ctx.base(), [ctx.adapter()], ctx.settings.ulp_tolerance
        )
        if merged_scan is not None:
            ctx.seed(MERGED_SCAN, merged_scan)
        if base_scan is not None:
            ctx.seed(BASE_SCAN, base_scan)
        return result

    return ctx.memo(ORACLE, compute)


def _share_oracle_pass(ctx: Context) -> None:
    """Run the oracle first when it will run anyway, so that its pass yields the scans too.

    A failure of the oracle stays memoised for the weights checks, which report it; the scan
    then reads the checkpoint on its own and reports only what concerns it.
    """
    if oracle_runs(ctx) and not ctx.known(ORACLE):
        with contextlib.suppress(Exception):
            oracle(ctx)


def merged_scan(ctx: Context) -> ScanResult:
    """Digests and NaN/Inf scan of the merged checkpoint (from the oracle's pass when it runs)."""
    _share_oracle_pass(ctx)
    return ctx.memo(MERGED_SCAN, lambda: scan_checkpoint(ctx.merged()))


def base_scan(ctx: Context) -> ScanResult:
    """Digests and NaN/Inf scan of the base checkpoint (from the oracle's pass when it runs)."""
    _share_oracle_pass(ctx)
    return ctx.memo(BASE_SCAN, lambda: scan_checkpoint(ctx.base()))


def growth(ctx: Context) -> Growths:
    """Tensors the merge grew (a vocabulary resized before training) and what explains them.

    Planned from the adapter and both checkpoints' headers; without an adapter, or with one the
    registry cannot plan, no growth is explained (the shape checks then fail as usual).
    """

    def compute() -> Growths:
        if not (ctx.has_base and ctx.has_adapter):
            return Growths()
        base = ctx.base()
        try:
            plan = plan_adapters([ctx.adapter()], Target(base.tensors, base.config or {}))
        except HarnessError:
            return Growths()
        return explain_growth(plan, ctx.merged().tensors)

    return ctx.memo(GROWTH, compute)
