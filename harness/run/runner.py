"""Run one check to a :class:`CheckResult`: errors become failed checks, hangs become timeouts."""

from __future__ import annotations

import threading
import time
import traceback

from harness.errors import HarnessError, one_line
from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult, Outcome


def run_check(check: Check, ctx: Context, timeout: float | None = None) -> CheckResult:
    """Run ``check`` and always return a result, never raise (KeyboardInterrupt excepted).

    A :class:`HarnessError` (bad input) is a failed check with its one-line cause. Any other
    exception is a failed check named as an internal error, with the traceback kept in
    ``result.traceback`` for ``--full-trace``. With ``timeout``, a check still running after
    that many seconds is failed as hung (its thread is abandoned: Python cannot kill it). A
    KeyboardInterrupt, whether pressed or raised by the check, still interrupts the run.
    """
    started = time.perf_counter()
    if timeout is None:
        result = _guarded(check, ctx)
    else:
        box: list[CheckResult] = []
        escaped: list[BaseException] = []

        def target() -> None:
            try:
                box.append(_guarded(check, ctx))
            except BaseException as exc:  # re-raised in the caller's thread below
                escaped.append(exc)

        thread = threading.Thread(target=target, name=f"check {check.id}", daemon=True)
        thread.start()
        thread.join(timeout)
        if escaped:
            raise escaped[0]
        if thread.is_alive() or not box:
            result = CheckResult.failed(
                f"timed out after {timeout:g} s (raise --merge-timeout if the inputs are large)"
            )
        else:
            result = box[0]
    if result.seconds is None:
        result.seconds = round(time.perf_counter() - started, 4)
    return result


def _guarded(check: Check, ctx: Context) -> CheckResult:
    try:
        result = check.run(ctx)
    except HarnessError as exc:
        return _blocked(check, ctx, exc) or CheckResult.failed(one_line(exc))
    except (MemoryError, RecursionError) as exc:
        return CheckResult.failed(f"ran out of resources: {type(exc).__name__}")
    except SystemExit as exc:  # a library calling sys.exit() must not end the whole run
        return CheckResult(
            Outcome.FAILED,
            f"internal error in {check.id}: SystemExit({exc.code!r})",
            traceback="".join(traceback.format_exception(exc)),
        )
    except Exception as exc:
        return CheckResult(
            Outcome.FAILED,
            f"internal error in {check.id}: {type(exc).__name__}: {one_line(exc)}",
            traceback="".join(traceback.format_exception(exc)),
        )
    if not isinstance(result, CheckResult):
        return CheckResult.failed(f"internal error: {check.id} returned {type(result).__name__}")
    return result


def _blocked(check: Check, ctx: Context, error: HarnessError) -> CheckResult | None:
    """A skip naming the root cause when an unreadable input is another check's to report.

    One unreadable merged folder would otherwise fail every check with the same line; its
    owner (``merge::structure::loads`` for the merged checkpoint) fails once, the rest skip.
    """
    which = ctx.input_failure(error)
    owner = ctx.owners.get(which) if which is not None else None
    if owner is None or owner == check.id:
        return None
    result = CheckResult.skipped(
        f"not checked: the {which} input cannot be read ({owner} reports why)"
    )
    result.blocked_by = owner
    return result
