"""The harness's own error types, and the one way an error becomes a one-line cause."""

from __future__ import annotations

import re

from harness.text import bounded, escape_controls, inert

__all__ = [
    "MAX_CAUSE",
    "AdapterError",
    "CheckpointError",
    "ConfigError",
    "HarnessError",
    "MergeError",
    "OutputError",
    "UnsupportedAdapterError",
    "bounded",
    "one_line",
]

#: Longest one-line cause a check reports; longer text is cut and its size stated.
MAX_CAUSE = 1000
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class HarnessError(Exception):
    """A bad input or an impossible request, with a one-line, user-facing cause.

    Checks turn it into a failed check whose message is ``str(error)``; it never reaches the user
    as a traceback.
    """


class CheckpointError(HarnessError):
    """A model checkpoint folder or safetensors file cannot be read as a valid checkpoint."""


class AdapterError(HarnessError):
    """A PEFT adapter folder cannot be read, or its config makes no sense."""


class ConfigError(HarnessError):
    """A gate configuration or lock file is malformed or has unknown keys."""


class UnsupportedAdapterError(HarnessError):
    """The adapter type is known to peft but the harness cannot verify it."""


class MergeError(HarnessError):
    """A merge cannot be done as asked (existing output, output inside an input, bad size...)."""


class OutputError(HarnessError):
    """An output file (lock, report, summary, merge) cannot be written: a symlink, a full disk."""


class ExportError(HarnessError):
    """An exported file (GGUF) cannot be read, or is not an export of the merged model."""


def one_line(error: BaseException | str, *, whole: bool = False, limit: int = MAX_CAUSE) -> str:
    """The cause of ``error`` on one bounded line, without terminal escapes.

    By default the first non-empty line (the harness's own messages put the cause there). With
    ``whole``, every line joined by `` / ``: libraries such as torch and transformers often put
    the real cause after a generic first line. Whatever the error quotes from an input is
    escaped (:mod:`harness.text`): no control character, no workflow command.
    """
    text = error if isinstance(error, str) else str(error)
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    if not lines:
        return "" if isinstance(error, str) else type(error).__name__
    return inert(escape_controls(bounded(" / ".join(lines) if whole else lines[0], limit)))
