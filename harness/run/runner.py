"""Run one check to a :class:`CheckResult`: errors become failed checks, hangs become timeouts.

Every result leaves here bounded and escaped (:mod:`harness.text`): its message, details and
figures quote tensor names, paths and config values from files a stranger may have written, and
they go on to the terminal, the reports and GitHub's workflow-command parser.
"""

from __future__ import annotations

import threading
import time
import traceback

from harness.errors import MAX_CAUSE, HarnessError, one_line
from harness.limits import Expired, Limit, enforceable, time_limit
from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult, Outcome
from harness.text import bounded_data, safe_line, safe_text

#: Detail lines a result keeps (the rest is counted in a last line).
MAX_DETAILS = 200
#: Characters of a traceback kept for ``--full-trace``.
MAX_TRACEBACK = 20_000


def _timed_out(timeout: float) -> CheckResult:
    return CheckResult.failed(
        f"timed out after {timeout:g} s (raise --merge-timeout if the inputs are large)"
    )


def run_check(check: Check, ctx: Context, timeout: float | None = None) -> CheckResult:
    """Run ``check`` and always return a result, never raise (KeyboardInterrupt excepted).

    A :class:`HarnessError` (bad input) is a failed check with its one-line cause. Any other
    exception is a failed check named as an internal error, with the traceback kept in
    ``result.traceback`` for ``--full-trace``. With ``timeout``, a check still running after
    that many seconds is failed as hung: on the main thread a ``SIGALRM`` timer interrupts the
    check itself, even inside a C loop that holds the GIL (:mod:`harness.limits`); elsewhere the
    check runs on a thread that is abandoned (Python cannot kill a thread). A KeyboardInterrupt,
    whether pressed or raised by the check, still interrupts the run.
    """
    started = time.perf_counter()
    if timeout is None:
        result = _guarded(check, ctx)
    elif enforceable():
        result = _interrupting(check, ctx, timeout)
    else:
        result = _threaded(check, ctx, timeout)
    if result.seconds is None:
        result.seconds = round(time.perf_counter() - started, 4)
    return sanitize(result)


def _interrupting(check: Check, ctx: Context, timeout: float) -> CheckResult:
    """Run on this (main) thread under a timer that interrupts the check when it rings."""
    mine: list[Limit | None] = []
    try:
        with time_limit(timeout) as limit:
            mine.append(limit)
            return _guarded(check, ctx)
    except Expired as exc:
        if mine and exc.limit is mine[0]:
            return _timed_out(timeout)
        raise


def _threaded(check: Check, ctx: Context, timeout: float) -> CheckResult:
    """Run on a thread of its own and stop waiting after ``timeout`` (off the main thread)."""
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
        return _timed_out(timeout)
    return box[0]


def sanitize(result: CheckResult) -> CheckResult:
    """Bound and escape everything a result quotes (message, details, figures, traceback)."""
    result.message = safe_line(result.message, MAX_CAUSE)
    details = list(result.details)
    if len(details) > MAX_DETAILS:
        details = [*details[:MAX_DETAILS], f"... {len(details) - MAX_DETAILS} more line(s)"]
    result.details = [safe_line(line) for line in details]
    result.metrics = bounded_data(result.metrics)
    # every targeted tensor keeps its row (the plot needs them all); only the text is bounded
    result.layers = bounded_data(result.layers, items=None)
    if result.traceback is not None:
        result.traceback = safe_text(result.traceback, MAX_TRACEBACK)
    return result


def _inputs(ctx: Context) -> str:
    """The inputs of the run, for a failure that could not name its file itself."""
    named = [(label, path) for label, path in (
        ("merged", ctx.settings.merged), ("base", ctx.settings.base),
        ("adapter", ctx.settings.adapter),
    ) if path is not None]
    return ", ".join(f"{label} {path}" for label, path in named) or "no input"


def _guarded(check: Check, ctx: Context) -> CheckResult:
    try:
        result = check.run(ctx)
    except HarnessError as exc:
        return _blocked(check, ctx, exc) or CheckResult.failed(one_line(exc))
    except (MemoryError, RecursionError) as exc:
        return CheckResult.failed(
            f"ran out of resources: {type(exc).__name__} while checking {_inputs(ctx)}"
        )
    except SystemExit as exc:  # a library calling sys.exit() must not end the whole run
        return CheckResult(
            Outcome.FAILED,
            f"internal error in {check.id}: SystemExit({exc.code!r})",
            traceback="".join(traceback.format_exception(exc)),
        )
    except Exception as exc:
        return CheckResult(
            Outcome.FAILED,
            f"internal error in {check.id}: {type(exc).__name__}: {one_line(exc)} (checking"
            f" {_inputs(ctx)})",
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
