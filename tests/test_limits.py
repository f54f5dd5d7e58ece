"""Time limits that fire while a computation holds the GIL, and Ctrl-C during such a computation.

The hostile computation is the real one: ``re`` backtracking on a catastrophic pattern, a C loop
that never releases the GIL (a watchdog thread cannot even run, and ``join(timeout)`` never
returns). The limits are the harness's own (``--merge-timeout``, :mod:`harness.limits`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from support.guard import install_family
from support.signals import sigint_as_from_a_terminal

from harness.limits import Expired, enforceable, run_limited, time_limit
from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult, Family, Outcome
from harness.run.runner import run_check
from harness.run.settings import Settings

#: Exponential in the length of the subject: hours at 40 characters.
CATASTROPHIC = (r"(a+)+$", "a" * 40 + "!")


def backtrack(ctx: object = None) -> CheckResult:
    re.match(*CATASTROPHIC)
    return CheckResult.passed("unreachable")


def test_limit_interrupts_a_regex_that_holds_the_gil():
    started = time.perf_counter()
    finished, value = run_limited(0.3, lambda: re.match(*CATASTROPHIC))
    elapsed = time.perf_counter() - started
    assert (finished, value) == (False, None)
    assert elapsed < 3, elapsed


def test_limits_nest_and_restore_the_previous_handler():
    before = signal.getsignal(signal.SIGALRM)
    with time_limit(30) as outer:
        assert outer is not None
        assert run_limited(0.2, lambda: re.match(*CATASTROPHIC)) == (False, None)
        # the inner limit is gone; the outer one still rings, in the outer block
        with pytest.raises(Expired) as caught:
            time.sleep(0.1)
            outer.deadline = time.monotonic()  # as if 30 s had passed
            with time_limit(10):
                time.sleep(5)
        assert caught.value.limit is outer
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_finished_computation_is_not_interrupted_later():
    assert run_limited(0.2, lambda: 42) == (True, 42)
    time.sleep(0.4)  # nothing rings after the block


def test_off_the_main_thread_a_limit_is_not_enforceable():
    seen: list[object] = []

    def probe() -> None:
        seen.append(enforceable())
        try:
            run_limited(1, lambda: 1)
        except RuntimeError as exc:
            seen.append(str(exc))

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert seen == [False, "a time limit needs the main thread of a POSIX process"]
    assert enforceable()


def test_a_thread_fallback_still_times_out():
    """Off the main thread the runner waits on a thread of its own (abandoned on timeout)."""
    release = threading.Event()
    check = Check(Family.STRUCTURE, "wait", "test-only", lambda ctx: release.wait(30))
    out: list[CheckResult] = []
    worker = threading.Thread(target=lambda: out.append(run_check(check, Context(Settings()),
                                                                  timeout=0.3)))
    worker.start()
    worker.join(10)
    release.set()
    assert out and out[0].message.startswith("timed out after 0.3 s")


def test_check_timeout_fires_inside_a_gil_holding_computation():
    check = Check(Family.STRUCTURE, "regex", "test-only", backtrack)
    started = time.perf_counter()
    result = run_check(check, Context(Settings()), timeout=0.5)
    elapsed = time.perf_counter() - started
    assert result.outcome is Outcome.FAILED
    assert result.message.startswith("timed out after 0.5 s")
    assert elapsed < 5, elapsed


def test_merge_timeout_end_to_end(pytester, monkeypatch, tiny_llama):
    """--merge-timeout fails the hung check and the run goes on; nothing is left running."""
    install_family(monkeypatch, {"regex": backtrack,
                                 "quick": lambda ctx: CheckResult.passed("fine")})
    started = time.perf_counter()
    result = pytester.runpytest("--merge-checks", "security", "--merge-timeout", "1",
                                "--merged-model", str(tiny_llama.merged))
    assert time.perf_counter() - started < 30
    assert result.ret == 1
    result.stdout.fnmatch_lines(["FAIL merge::security::regex *timed out after 1 s*",
                                 "PASS merge::security::quick *fine"])


CONFTEST = textwrap.dedent("""
    import re, sys, types
    from harness.checks import FAMILIES
    from harness.run.check import Check
    from harness.run.result import CheckResult, Family

    def hang(ctx):
        print("hanging", flush=True)
        re.match(r"(a+)+$", "a" * 40 + "!")
        return CheckResult.passed("unreachable")

    module = types.ModuleType("hostile_family")
    module.checks = lambda settings: [Check(Family.SECURITY, "hang", "regex", hang)]
    sys.modules[module.__name__] = module
    FAMILIES[Family.SECURITY] = module.__name__
""")


@pytest.mark.parametrize("timeout", [[], ["--merge-timeout", "600"]], ids=["plain", "timed"])
def test_ctrl_c_interrupts_a_gil_holding_check(pytester, tiny_llama, timeout):
    """Ctrl-C (SIGINT) ends a run stuck in a catastrophic regex at once, timed check or not."""
    pytester.makeconftest(CONFTEST)
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-s", "--merge-checks", "security",
         "--merged-model", str(tiny_llama.merged), *timeout],
        cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=sigint_as_from_a_terminal,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "hanging" in line:
                break
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        started = time.perf_counter()
        output, _ = process.communicate(timeout=30)
        assert time.perf_counter() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 2, output  # pytest's "interrupted"
    assert "KeyboardInterrupt" in output
