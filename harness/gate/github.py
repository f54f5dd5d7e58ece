r"""GitHub Actions integration: workflow-command annotations, the step summary and step outputs.

Everything here is plain text plumbing with no pytest and no torch, and each writer is a no-op
unless ``GITHUB_ACTIONS`` is ``"true"``, so the same gate command behaves identically on a laptop.
The formats follow GitHub's workflow-command rules as implemented by ``@actions/core``:

- annotations are ``::error title=T,file=F::message`` lines on stdout; the message escapes
  ``%``, ``\r`` and ``\n``, property values additionally ``:`` and ``,``;
- ``$GITHUB_STEP_SUMMARY`` is a markdown file the step appends to (GitHub shows at most 1 MiB);
- ``$GITHUB_OUTPUT`` takes ``name<<DELIMITER`` heredocs, safe for any value, multiline included.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from harness.text import escape_controls, safe_text

#: Annotation levels GitHub understands, by name of the workflow command.
LEVELS = ("error", "warning", "notice")

#: Annotations GitHub shows per step and level; further ones are dropped silently by GitHub,
#: so the harness rolls the rest up into one final annotation instead.
MAX_ANNOTATIONS = 10

#: GitHub refuses step summaries above 1 MiB; we truncate below that with a note.
SUMMARY_LIMIT = 1024 * 1024

#: Lines of figures an annotation carries under its one-line cause; the job summary has all.
MAX_DETAIL_LINES = 8

#: Outcomes of a check in the JSON report, by the annotation level they produce.
_LEVEL_OF_OUTCOME = {"failed": "error", "inconclusive": "warning", "warning": "warning"}


def in_actions(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs as a GitHub Actions step (``GITHUB_ACTIONS=true``)."""
    environ = os.environ if env is None else env
    return environ.get("GITHUB_ACTIONS", "").lower() == "true"


def escape_data(text: str) -> str:
    r"""Escape an annotation message: ``%``, CR and LF (``%`` first, so nothing is escaped twice).

    Other control characters and lone surrogates become ``\x``/``\u`` escapes first
    (:func:`harness.text.escape_controls`): they could not be written to a UTF-8 stdout.
    """
    text = escape_controls(text, keep="\r\n")
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape an annotation property value: as :func:`escape_data`, plus ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(name: str, message: str, properties: Mapping[str, object] | None = None) -> str:
    """One workflow command line, e.g. ``::error title=merge%3A%3Ax::cause``.

    Properties whose value is None or empty are left out (GitHub rejects empty ones).
    """
    props = ",".join(
        f"{key}={escape_property(str(value))}"
        for key, value in (properties or {}).items()
        if value is not None and str(value) != ""
    )
    head = f"::{name} {props}" if props else f"::{name}"
    return f"{head}::{escape_data(message)}"


def annotation(
    level: str,
    message: str,
    *,
    title: str | None = None,
    file: str | None = None,
    line: int | None = None,
) -> str:
    """An ``::error``/``::warning``/``::notice`` line with an optional title and location."""
    if level not in LEVELS:
        raise ValueError(f"annotation level must be one of {', '.join(LEVELS)}, got {level!r}")
    return command(level, message, {"title": title, "file": file, "line": line})


def _check_message(check: Mapping[str, Any]) -> str:
    """The message of one check: its one-line cause, then the first lines of its figures."""
    lines = [str(check.get("message", "")).strip() or "(no message)"]
    details = [str(d) for d in check.get("details", []) or []]
    lines.extend(details[:MAX_DETAIL_LINES])
    if len(details) > MAX_DETAIL_LINES:
        lines.append(f"... {len(details) - MAX_DETAIL_LINES} more line(s) in the job summary")
    return "\n".join(lines)


def report_annotations(
    report: Mapping[str, Any],
    *,
    limit: int = MAX_ANNOTATIONS,
    files: Mapping[str, str | None] | None = None,
) -> list[str]:
    """Annotation lines for the checks of a JSON report that did not pass.

    A failed check gives an ``::error`` titled by its id; an inconclusive one or a warning gives
    a ``::warning``. GitHub shows only ``limit`` annotations of a level per step, so beyond
    ``limit - 1`` the rest of that level is rolled up into one annotation that names how many
    were left out. ``files`` maps a check id to the file (relative to the repository) its
    annotation is anchored to, e.g. the lock file for the lock check.
    """
    anchors = files or {}
    by_level: dict[str, list[Mapping[str, Any]]] = {level: [] for level in LEVELS}
    for check in report.get("checks", []) or []:
        level = _LEVEL_OF_OUTCOME.get(str(check.get("outcome", "")))
        if level is not None:
            by_level[level].append(check)
    lines: list[str] = []
    for level, checks in by_level.items():
        shown = checks if len(checks) <= limit else checks[: max(limit - 1, 0)]
        for check in shown:
            title = str(check.get("id") or check.get("name") or "merge-harness")
            lines.append(
                annotation(level, _check_message(check), title=title, file=anchors.get(title))
            )
        hidden = checks[len(shown):]
        if hidden:
            names = ", ".join(str(c.get("id", "?")) for c in hidden)
            noun = "failed" if level == "error" else "not passed"
            lines.append(
                annotation(
                    level,
                    f"{len(hidden)} more check(s) {noun}: {names} (see the job summary)",
                    title="merge-harness",
                )
            )
    return lines


def emit(lines: Iterable[str], stream: TextIO | None = None) -> None:
    """Print workflow-command lines to stdout (where the runner reads them) and flush."""
    out = sys.stdout if stream is None else stream
    for line in lines:
        out.write(line + "\n")
    out.flush()


def append_summary(markdown: str, env: Mapping[str, str] | None = None) -> Path | None:
    """Append ``markdown`` to ``$GITHUB_STEP_SUMMARY``; return the file, or None outside Actions.

    Text past GitHub's 1 MiB limit is cut at a line boundary and a note says so, because GitHub
    would otherwise drop the whole summary of the step. Every line is escaped and inert
    (:func:`harness.text.safe_text`): the summary quotes what the checks found in the inputs.
    """
    environ = os.environ if env is None else env
    target = environ.get("GITHUB_STEP_SUMMARY", "")
    if not in_actions(environ) or not target:
        return None
    path = Path(target)
    existing = path.stat().st_size if path.exists() else 0
    text = safe_text(markdown.rstrip("\n")) + "\n"
    room = SUMMARY_LIMIT - existing - 256
    data = text.encode("utf-8")
    if len(data) > room:
        cut = data[: max(room, 0)].decode("utf-8", errors="ignore")
        cut = cut[: cut.rfind("\n") + 1]
        note = "*merge-harness: summary truncated at GitHub's 1 MiB limit; see the reports.*"
        text = f"{cut}\n{note}\n"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)
    return path


def _delimiter(name: str, value: str) -> str:
    """A heredoc delimiter that occurs in neither the name nor the value."""
    while True:
        candidate = f"ghadelimiter_{secrets.token_hex(16)}"
        if candidate not in name and candidate not in value:
            return candidate


def format_output(name: str, value: object) -> str:
    """One ``$GITHUB_OUTPUT`` entry as a heredoc: safe for newlines, ``=`` and ``<<`` in values."""
    if not name or any(c in name for c in "\r\n=") or "<<" in name:
        raise ValueError(f"invalid step output name {name!r}")
    text = str(value)
    delimiter = _delimiter(name, text)
    return f"{name}<<{delimiter}\n{text}\n{delimiter}\n"


def write_outputs(
    outputs: Mapping[str, object], env: Mapping[str, str] | None = None
) -> Path | None:
    """Append step outputs to ``$GITHUB_OUTPUT``; return the file, or None outside Actions."""
    environ = os.environ if env is None else env
    target = environ.get("GITHUB_OUTPUT", "")
    if not in_actions(environ) or not target:
        return None
    path = Path(target)
    # a value is written as it is (a heredoc holds any text); a lone surrogate (from a file name
    # that is not UTF-8) is written as its escape rather than failing to encode
    with path.open("a", encoding="utf-8", errors="backslashreplace") as handle:
        for name, value in outputs.items():
            handle.write(format_output(name, value))
    return path


def parse_outputs(text: str) -> dict[str, str]:
    """Read a ``$GITHUB_OUTPUT`` file back (both ``name=value`` and heredoc entries).

    This is what the runner does with the file; the tests and the self-test job use it.
    """
    result: dict[str, str] = {}
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line:
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            body: list[str] = []
            while index < len(lines) and lines[index] != delimiter:
                body.append(lines[index])
                index += 1
            if index >= len(lines):
                raise ValueError(f"unterminated output {name!r}: no closing {delimiter!r}")
            index += 1
            result[name] = "\n".join(body)
        else:
            name, _, value = line.partition("=")
            result[name] = value
    return result
