"""Time limits that fire even while a computation holds the GIL.

A thread cannot stop another thread, and a thread waiting with ``join(timeout)`` never wakes
while the one it waits for holds the GIL in a C loop (``re`` backtracking on a catastrophic
pattern runs for hours without releasing it). A signal can: ``SIGALRM`` from
``signal.setitimer`` is delivered to the main thread, whose signal handler runs at the next
point the interpreter checks for signals, and ``re`` checks for them while it backtracks (so
does ``time.sleep``, a lock wait, and every Python bytecode). The handler raises
:class:`Expired` in the computation itself, which unwinds it like ``KeyboardInterrupt`` does.

Limits nest (a check's ``--merge-timeout`` around a regex budget inside it): one timer is armed
for the earliest deadline of the active limits. A limit is only enforceable on the main thread
of a POSIX process whose ``SIGALRM`` nobody else uses (pytest-timeout's signal method, say);
elsewhere :func:`time_limit` yields ``None`` and callers bound the work another way.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class Expired(BaseException):
    """A :func:`time_limit` ran out; raised in the limited computation itself.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that code catching ``Exception``
    (libraries, the context's memo) cannot swallow it: only the limit's owner catches it.
    """

    def __init__(self, limit: Limit) -> None:
        super().__init__(f"time limit of {limit.seconds:g} s exceeded")
        self.limit = limit


@dataclass(eq=False)
class Limit:
    """One active time limit: its length and its deadline on the monotonic clock."""

    seconds: float
    deadline: float
    expired: bool = False


#: Active limits, outermost first (only ever touched on the main thread, SIGALRM blocked).
_active: list[Limit] = []
#: The SIGALRM handler in place before the first limit (restored after the last).
_previous: list[Any] = []


def enforceable() -> bool:
    """Whether a limit can interrupt code here: main thread, POSIX timers, SIGALRM unused."""
    if not hasattr(signal, "setitimer"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    if _active:
        return True
    handler = signal.getsignal(signal.SIGALRM)
    foreign_handler = handler not in (signal.SIG_DFL, signal.SIG_IGN, None)
    return not foreign_handler and signal.getitimer(signal.ITIMER_REAL)[0] == 0


@contextmanager
def _alarm_blocked() -> Iterator[None]:
    """Hold SIGALRM back while the list of limits and the timer change together."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


def _arm() -> None:
    """Arm the timer for the earliest active deadline, or restore the previous handler."""
    if _active:
        soonest = min(limit.deadline for limit in _active)
        signal.setitimer(signal.ITIMER_REAL, max(soonest - time.monotonic(), 1e-4))
        return
    signal.setitimer(signal.ITIMER_REAL, 0)
    if _previous:
        signal.signal(signal.SIGALRM, _previous.pop())


def _drop(limit: Limit) -> None:
    """Remove ``limit`` and every limit nested inside it (idempotent)."""
    if limit in _active:
        del _active[_active.index(limit):]
    _arm()


def _on_alarm(signum: int, frame: Any) -> None:
    now = time.monotonic()
    due = next((limit for limit in _active if limit.deadline <= now), None)
    if due is None:  # woken early (clock granularity): wait for the rest
        _arm()
        return
    # The bookkeeping happens here, not only in time_limit's finally: the exception may
    # unwind a frame before its cleanup starts.
    due.expired = True
    _drop(due)
    raise Expired(due)


@contextmanager
def time_limit(seconds: float) -> Iterator[Limit | None]:
    """Raise :class:`Expired` inside the block once ``seconds`` have passed.

    Yields the :class:`Limit` (compare ``error.limit is limit`` to tell this limit's expiry from
    an outer one's), or None when the limit cannot be enforced here (see :func:`enforceable`).
    """
    if not enforceable():
        yield None
        return
    limit = Limit(seconds, time.monotonic() + seconds)
    with _alarm_blocked():
        if not _active:
            _previous.append(signal.signal(signal.SIGALRM, _on_alarm))
        _active.append(limit)
        _arm()
    try:
        yield limit
    finally:
        with _alarm_blocked():
            _drop(limit)


def run_limited(seconds: float, compute: Callable[[], T]) -> tuple[bool, T | None]:
    """``(True, compute())``, or ``(False, None)`` when ``seconds`` ran out first.

    Raises :class:`RuntimeError` when the limit cannot be enforced on this thread: the caller
    must then bound the work another way. An outer limit's expiry propagates.
    """
    mine: list[Limit] = []
    try:
        with time_limit(seconds) as limit:
            if limit is None:
                raise RuntimeError("a time limit needs the main thread of a POSIX process")
            mine.append(limit)
            return True, compute()
    except Expired as exc:
        # caught outside the block: the alarm may also ring between compute() and the exit
        if mine and exc.limit is mine[0]:
            return False, None
        raise
