"""The streamed passes several families share: one read of the bytes serves them all.

The weight oracle's pass computes both checkpoints' digests and NaN/Inf scans on the bytes it
reads anyway. :func:`scans` therefore runs the oracle when the weights family will run it
regardless, and a plain scan otherwise: one explicit decision, in one place, instead of a
structure check reaching sideways into the weights family. Under pytest-xdist the pass is
divided among the workers (:mod:`harness.checks.split`) and each worker combines the parts.
"""

from __future__ import annotations

import contextlib

from harness.checks.sizes import justified_sizes
from harness.checks.split import shared_pass, uses_oracle
from harness.deltas import Target, plan_adapters
from harness.deltas.growth import Growths, explain_growth
from harness.errors import HarnessError
from harness.oracle.parts import Combined
from harness.oracle.stream import OracleResult, run_oracle
from harness.run.context import Context, Key
from harness.stream.scan import ScanResult, scan_checkpoint

ORACLE: Key[OracleResult] = Key("pass:oracle")
MERGED_SCAN: Key[ScanResult] = Key("pass:scan:merged")
BASE_SCAN: Key[ScanResult] = Key("pass:scan:base")
GROWTH: Key[Growths] = Key("pass:growth")

#: Whether the weights family will run the oracle (base and adapter given, selected).
oracle_runs = uses_oracle


def _shared(ctx: Context) -> Combined:
    """The pass divided among xdist workers, combined; seeds both scans and the oracle."""
    share = ctx.settings.share
    assert share is not None
    combined = shared_pass(ctx, share, ctx.settings.peers)
    if combined.oracle is not None:
        ctx.seed(ORACLE, combined.oracle)
    ctx.seed(MERGED_SCAN, combined.merged)
    if combined.base is not None:
        ctx.seed(BASE_SCAN, combined.base)
    return combined


def oracle(ctx: Context) -> OracleResult:
    """The memoised oracle pass of this run; it also records both checkpoints' scans."""

    def compute() -> OracleResult:
        if ctx.settings.share is not None:
            found = _shared(ctx).oracle
            if found is None:
                raise HarnessError("the shared pass did not run the oracle")
            return found
        justified_sizes(ctx)
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
    if ctx.settings.share is not None:
        return ctx.memo(MERGED_SCAN, lambda: _shared(ctx).merged)
    _share_oracle_pass(ctx)

    def scan() -> ScanResult:
        justified_sizes(ctx)
        return scan_checkpoint(ctx.merged())

    return ctx.memo(MERGED_SCAN, scan)


def base_scan(ctx: Context) -> ScanResult:
    """Digests and NaN/Inf scan of the base checkpoint (from the oracle's pass when it runs)."""
    if ctx.settings.share is not None:

        def shared_base() -> ScanResult:
            found = _shared(ctx).base
            if found is None:
                raise HarnessError("no base model: pass --base-model PATH")
            return found

        return ctx.memo(BASE_SCAN, shared_base)
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
