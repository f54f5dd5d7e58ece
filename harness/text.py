r"""Untrusted text made safe to show: bounded, on one line, and inert as a workflow command.

Tensor names, config values, file names and paths come from files a stranger can put in a pull
request. Before such text reaches stdout, stderr, a report or a GitHub file it goes through this
module, the one place that decides how:

- :func:`bounded` cuts it to a length and states how much was left out (a 50 MB config value
  must not become 50 MB of log);
- :func:`escape_controls` writes control characters, line and paragraph separators, invisible
  and bidirectional formatting characters and lone surrogates as ``\xNN``/``\uNNNN`` escapes,
  so the text cannot break a line, move the cursor, reorder what a reviewer reads, or fail to
  encode as UTF-8 (a non-UTF-8 file name decodes to lone surrogates);
- :func:`inert` keeps a line from being read as a GitHub Actions workflow command. The runner
  reads every line of a step's stdout and stderr: after leading whitespace, ``::name ...::data``
  is a command (``::error``, ``::add-mask``, ``::stop-commands``...), and so is the legacy
  ``##[name]data`` form *anywhere* in a line. The first ``:`` of a leading ``::`` becomes
  ``%3A`` and every ``##[`` becomes ``##%5B`` (GitHub's own percent-escapes), which GitHub
  shows as text.

:func:`safe_line` does all three, for one value or one line; :func:`safe_text` for a block.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: Longest value (a name, a path, a config value) echoed in a message, detail or report field.
MAX_VALUE = 1000

#: Characters never shown raw: C0/C1 controls and DEL, line and paragraph separators, lone
#: surrogates, and the invisible or bidirectional formatting characters ("Trojan source").
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb"
    "\ud800-\udfff]"
)
#: Legacy workflow commands are recognised anywhere in a line.
_LEGACY = "##["


def bounded(text: str, limit: int = MAX_VALUE) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


#: The escapes everyone reads (as in Python's repr); the rest are written by code point.
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


#: Characters of one value quoted inside a message (a name, a config value).
MAX_SHOWN = 200


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` for a message, cut *before* it is built when the value is long.

    A 50 MB config string quoted with ``{value!r}`` would first become a 50 MB message; this
    quotes its first ``limit`` characters and states the size of the rest.
    """
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value) - limit} more characters)"
    if isinstance(value, (list, tuple, dict)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    return bounded(repr(value), limit)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str, keep: str = "") -> str:
    r"""``text`` with every unsafe character (see the module docs) as a ``\x``/``\u`` escape.

    Characters in ``keep`` stay as they are (a caller that escapes newlines its own way).
    """
    if keep:
        return _UNSAFE.sub(lambda m: m.group() if m.group() in keep else _escape(m), text)
    return _UNSAFE.sub(_escape, text)


def inert(line: str) -> str:
    """One line that GitHub Actions cannot read as a workflow command (see the module docs)."""
    stripped = line.lstrip()
    if stripped.startswith("::"):
        line = f"{line[: len(line) - len(stripped)]}%3A{stripped[1:]}"
    return line.replace(_LEGACY, "##%5B")


def safe_line(text: object, limit: int = MAX_VALUE) -> str:
    """Any value as one bounded, escaped, inert line (what every echo of an input goes through)."""
    return inert(escape_controls(bounded(str(text), limit)))


def safe_text(text: str, limit: int | None = None) -> str:
    """A block of lines, each escaped and inert; the line breaks themselves are kept."""
    if limit is not None:
        text = bounded(text, limit)
    return "\n".join(inert(escape_controls(line)) for line in text.split("\n"))


def is_command(line: str) -> bool:
    """Whether GitHub Actions would read ``line`` as a workflow command (for tests and checks)."""
    return line.lstrip().startswith("::") or _LEGACY in line


#: Entries of a list or mapping kept in a report field; the rest is counted, not shown.
MAX_ITEMS = 1000


def bounded_data(value: Any, limit: int = MAX_VALUE, items: int | None = MAX_ITEMS) -> Any:
    """A JSON-able value with every string a :func:`safe_line`, and long collections cut.

    What a report shows of figures that may quote an input (tensor names, config keys). A cut
    list ends with a ``"... N more"`` entry and a cut mapping with a ``"..."`` key, so the size
    is stated. Numbers, booleans and None pass unchanged.
    """
    if isinstance(value, str):
        return safe_line(value, limit)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for index, (key, item) in enumerate(value.items()):
            if items is not None and index == items:
                out["..."] = f"{len(value) - items} more entries"
                break
            out[safe_line(key, limit)] = bounded_data(item, limit, items)
        return out
    if isinstance(value, (list, tuple)):
        kept = list(value) if items is None else list(value[:items])
        cut = [bounded_data(item, limit, items) for item in kept]
        if len(kept) < len(value):
            cut.append(f"... {len(value) - len(kept)} more")
        return cut
    return value
