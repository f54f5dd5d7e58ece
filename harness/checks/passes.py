"""The streamed passes several families share: one read of the bytes serves them all.

The weight oracle's pass computes both checkpoints' digests and NaN/Inf scans on the bytes it
reads anyway. :func:`scans` therefore runs the oracle when the weights family will run it
regardless, and a plain scan otherwise: one explicit decision, in one place, instead of a
structure check reaching sideways into the weights family.
"""

from __future__ import annotations

import contextlib

from harness.errors import CheckpointError
from harness.memory import GIB, shortfall
from harness.oracle.stream import OracleResult, run_oracle
from harness.run.context import Context, Key
from harness.run.result import Family
from harness.stream.scan import ScanResult, scan_checkpoint

#: How much larger than the largest base or adapter tensor a merged tensor may be (a merge
#: never grows a tensor; a resized vocabulary grows the embedding by a few rows).
GROWTH = 2
SIZES: Key[int | None] = Key("pass:sizes")
ORACLE: Key[OracleResult] = Key("pass:oracle")
MERGED_SCAN: Key[ScanResult] = Key("pass:scan:merged")
BASE_SCAN: Key[ScanResult] = Key("pass:scan:base")


def justified_sizes(ctx: Context) -> int | None:
    """Refuse, before a byte is read, a merged tensor larger than the inputs justify.

    A streamed pass holds whole tensors: a checkpoint that declares one of many GiB decides how
    much memory the run takes. Each merged tensor must be at most :data:`GROWTH` times the
    largest tensor of the base and the adapter (when a base is given), and must fit in the
    memory available now. Returns the bound (None without a base). Raises CheckpointError
    naming the file and the tensor.
    """

    def compute() -> int | None:
        merged = ctx.merged()
        limit = None
        if ctx.has_base:
            sizes = [t.nbytes for t in ctx.base().tensors.values()]
            if ctx.has_adapter:
                with contextlib.suppress(Exception):  # an unreadable adapter is reported elsewhere
                    sizes += [t.nbytes for t in ctx.adapter().tensors.values()]
            limit = GROWTH * max(sizes, default=0)
        for info in sorted(merged.tensors.values(), key=lambda t: -t.nbytes):
            if limit is not None and info.nbytes > limit:
                raise CheckpointError(
                    f"{info.file}: tensor {info.name!r} holds {info.nbytes / GIB:.2f} GiB, more"
                    f" than {GROWTH}x any tensor of the base or the adapter"
                    f" ({limit / GROWTH / GIB:.3f} GiB): refusing to read it (a merge never"
                    " grows a tensor)"
                )
            problem = shortfall(2 * info.nbytes, "cpu", f"tensor {info.name!r}")
            if problem is not None:
                raise CheckpointError(f"{info.file}: {problem}; refusing to read it")
            break  # sorted by size: the largest decides
        return limit

    return ctx.memo(SIZES, compute)


def oracle_runs(ctx: Context) -> bool:
    """Whether the weights family will run the oracle (base and adapter given, selected)."""
    return ctx.has_base and ctx.has_adapter and ctx.settings.runs(Family.WEIGHTS)


def oracle(ctx: Context) -> OracleResult:
    """The memoised oracle pass of this run; it also records both checkpoints' scans."""

    def compute() -> OracleResult:
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
    _share_oracle_pass(ctx)
    justified_sizes(ctx)
    return ctx.memo(MERGED_SCAN, lambda: scan_checkpoint(ctx.merged()))


def base_scan(ctx: Context) -> ScanResult:
    """Digests and NaN/Inf scan of the base checkpoint (from the oracle's pass when it runs)."""
    _share_oracle_pass(ctx)
    return ctx.memo(BASE_SCAN, lambda: scan_checkpoint(ctx.base()))
