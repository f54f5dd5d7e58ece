"""Children that receive Ctrl-C as a user's terminal delivers it."""

from __future__ import annotations

import signal


def sigint_as_from_a_terminal() -> None:
    """``preexec_fn`` for a child the test interrupts with SIGINT.

    A shell without job control (``cmd &`` in a script, nohup, some CI runners) starts
    background commands with SIGINT ignored, children inherit that, and Python then installs no
    KeyboardInterrupt handler: the test would measure the runner, not the harness.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
