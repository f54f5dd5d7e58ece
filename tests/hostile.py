"""Builders of hostile inputs, and a model of how the GitHub Actions runner reads a log.

The inputs are made the way an attacker makes them: raw safetensors headers written by hand
(any name, any JSON), configs with any value, symlinks and special files planted in folders.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from support.damage import join, split

#: Workflow commands as GitHub documents them, in the forms an attacker would plant.
COMMAND_FORMS = (
    "::error title=merge-harness::gate PASSED",
    "::error file=app.js,line=1,col=5,endColumn=7::Missing semicolon",
    "::warning::w",
    "::notice title=t::n",
    "::debug::d",
    "::group::g",
    "::endgroup::",
    "::add-mask::secret",
    "::set-output name=outcome::passed",
    "::save-state name=x::y",
    "::stop-commands::token",
    "::add-matcher::matcher.json",
    "::echo::on",
    "##[error]legacy",
    "##[set-output name=outcome;]passed",
)


def add_tensor(path: Path, name: str, nbytes: int = 4) -> None:
    """Append a U8 tensor called ``name`` to a single-file checkpoint (header written raw)."""
    header, data = split(path)
    header[name] = {"dtype": "U8", "shape": [nbytes], "data_offsets": [len(data),
                                                                      len(data) + nbytes]}
    path.write_bytes(join(header, data + bytes(range(nbytes))))


def hostile_merge(source: Path, target: Path, text: str) -> Path:
    """A copy of a merged folder with ``text`` as a tensor name and as config keys and values."""
    shutil.copytree(source, target)
    add_tensor(target / "model.safetensors", text)
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config["hostile_value"] = text
    config[text] = 1
    config_path.write_text(json.dumps(config))
    return target


@dataclass(frozen=True)
class Command:
    """A workflow command the runner would execute."""

    name: str
    properties: dict[str, str]
    data: str
    line: str


def _unescape(text: str) -> str:
    for code, char in (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","), ("%25", "%")):
        text = text.replace(code, char)
    return text


def executed_commands(text: str) -> list[Command]:
    """The commands GitHub's runner executes when a step prints ``text``.

    Like ``ActionCommandManager``: lines split at CR, LF or CRLF; a line is a command when, after
    leading whitespace, it starts ``::name``, or when it holds ``##[name]`` anywhere (the legacy
    form); ``::stop-commands::TOKEN`` ignores every command until a ``::TOKEN::`` line.
    """
    found: list[Command] = []
    stopped: str | None = None
    for line in re.split(r"\r\n|\r|\n", text):
        stripped = line.lstrip()
        if stopped is not None:
            if stripped == f"::{stopped}::":
                stopped = None
            continue
        if stripped.startswith("::"):
            head, sep, data = stripped[2:].partition("::")
            if not sep:
                continue
            name, _, props = head.partition(" ")
            properties = {}
            for pair in filter(None, props.split(",")):
                key, _, value = pair.partition("=")
                properties[key] = _unescape(value)
            if name == "stop-commands":
                stopped = data
            found.append(Command(name, properties, _unescape(data), line))
        elif "##[" in line:
            name = line.split("##[", 1)[1].split("]", 1)[0].split(" ", 1)[0]
            found.append(Command(name, {}, "", line))
    return found


#: Titles of the annotations the harness itself prints.
OWN_TITLE = re.compile(r"(merge::[a-z_]+::[A-Za-z0-9_.]+|merge-harness|merge-harness gate)")


def foreign_commands(text: str, allowed_tokens: Iterable[str] = ()) -> list[Command]:
    """Executed commands the harness did not mean to print (the attack, if any got through).

    The harness prints ``::error``/``::warning``/``::notice`` annotations titled by a check id
    (or the gate), and the gate brackets pytest's output with ``::stop-commands::`` and its
    random token. Anything else is foreign.
    """
    tokens = set(allowed_tokens)
    foreign = []
    for command in executed_commands(text):
        if command.name in ("error", "warning", "notice"):
            if OWN_TITLE.fullmatch(command.properties.get("title", "")) and set(
                command.properties
            ) <= {"title", "file", "line"}:
                continue
        elif (command.name == "stop-commands" and command.data in tokens) or (
            command.name in tokens and not command.data
        ):
            continue
        foreign.append(command)
    return foreign
