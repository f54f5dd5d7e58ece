"""Command-line options and ini keys of the plugin, and their translation into a ``Request``.

The knobs (``--merge-ulp``, ``--merge-device``...) come from :data:`harness.run.knobs.KNOBS`:
each is parsed by its own typed function, so a bad value is pytest's usage error (exit 4) with
the knob's message, and an option left out stays *unset* (the configuration file may then set
it). Nothing here decides precedence: :func:`harness.run.settings.resolve` does, once.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.run.knobs import KNOBS, Knob, KnobError
from harness.run.settings import Request

GROUP = "merge-harness"

#: (flag, dest and ini key, help) of the three inputs.
PATH_OPTIONS = (
    ("--merged-model", "merged_model", "the merged checkpoint folder to verify"),
    (
        "--base-model",
        "base_model",
        "the base checkpoint folder (default: the adapter's"
        " base_model_name_or_path when it is a local folder)",
    ),
    ("--adapter", "adapter", "the PEFT adapter folder that was merged"),
)
#: The repeatable option naming exported files to verify against the merged model.
EXPORT_OPTION = (
    "--export",
    "export",
    "an exported file to verify against the merged model: a .gguf file or the first part of a"
    " split one (repeatable; needs the gguf extra: pip install 'pytest-merge-harness[gguf]')",
)
#: (flag, dest, help) of the boolean switches.
SWITCHES = (
    (
        "--merge-allow-pickle",
        "merge_allow_pickle",
        "read pickle .bin checkpoints (with torch.load(weights_only=True) only)",
    ),
    (
        "--merge-trust-remote-code",
        "merge_trust_remote_code",
        "allow configs with auto_map custom code (off: such configs are refused)",
    ),
    (
        "--update-merge-lock",
        "update_merge_lock",
        "record the digests and benchmark results of this run in the lock file",
    ),
)
#: (flag, dest, metavar, help) of the files the run reads or writes.
FILE_OPTIONS = (
    (
        "--merge-config",
        "merge_config",
        "FILE",
        "gate configuration (default: [tool.merge-harness] in pyproject.toml, or"
        " merge-harness.toml)",
    ),
    (
        "--merge-lock",
        "merge_lock",
        "FILE",
        "lock file of approved digests and results (default: merge-harness.lock beside the"
        " config)",
    ),
    ("--merge-report", "merge_report", "PATH", "write a JSON report of every check"),
    (
        "--merge-summary",
        "merge_summary",
        "PATH",
        "write a GitHub-flavoured markdown summary (for $GITHUB_STEP_SUMMARY)",
    ),
)


def argument_type(knob: Knob) -> Callable[[str], Any]:
    """An argparse ``type=`` for ``knob``: its parser, with its message on a bad value."""

    def convert(text: str) -> Any:
        try:
            return knob.parse(text)
        except KnobError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = knob.name
    return convert


def add_options(parser: pytest.Parser) -> None:
    """Register the option group shown by ``pytest --help`` and the matching ini keys."""
    group = parser.getgroup(GROUP, "merge-harness: verify a merged LoRA/PEFT checkpoint")
    for flag, dest, text in PATH_OPTIONS:
        group.addoption(flag, dest=dest, metavar="PATH", default=None, help=text)
        parser.addini(dest, f"{text} (relative to the ini file)", type="string", default="")
    flag, dest, text = EXPORT_OPTION
    group.addoption(flag, dest=dest, metavar="PATH", action="append", default=None, help=text)
    for knob in KNOBS:
        default = "" if knob.default is None else f" (default: {knob.default})"
        group.addoption(
            knob.flag,
            dest=knob.dest,
            type=argument_type(knob),
            default=None,
            metavar=knob.metavar,
            help=f"{knob.help}{default}; config key {knob.key}",
        )
    for flag, dest, text in SWITCHES:
        group.addoption(flag, dest=dest, action="store_true", default=False, help=text)
    for flag, dest, metavar, text in FILE_OPTIONS:
        group.addoption(flag, dest=dest, default=None, metavar=metavar, help=text)


def _path(config: pytest.Config, dest: str) -> Path | None:
    value: Any = config.getoption(dest)
    if value:
        return Path(value).expanduser().absolute()
    ini = str(config.getini(dest) or "")
    if ini:
        anchor = config.inipath.parent if config.inipath else config.rootpath
        return (anchor / Path(ini).expanduser()).absolute()
    return None


def _file(config: pytest.Config, dest: str) -> Path | None:
    value = config.getoption(dest)
    return Path(value).expanduser().absolute() if value else None


def _exports(config: pytest.Config) -> tuple[Path, ...]:
    values: list[str] = config.getoption(EXPORT_OPTION[1]) or []
    return tuple(Path(v).expanduser().absolute() for v in values)


def wanted(config: pytest.Config) -> bool:
    """Whether this run asked for merge checks at all (cheap: no imports beyond options)."""
    return any(_path(config, dest) for _, dest, _ in PATH_OPTIONS) or bool(_exports(config))


def read_request(config: pytest.Config) -> Request:
    """The :class:`Request` the command line and ini file make; UsageError if an input is absent."""
    inputs = {dest: _path(config, dest) for _, dest, _ in PATH_OPTIONS}
    for flag, dest, _ in PATH_OPTIONS:
        path = inputs[dest]
        if path is not None and not path.exists():
            raise pytest.UsageError(f"{flag} {path}: no such file or folder")
    exports = _exports(config)
    for path in exports:
        if not path.is_file():
            raise pytest.UsageError(f"--export {path}: no such file")
    if exports and importlib.util.find_spec("gguf") is None:
        raise pytest.UsageError(
            "--export needs the gguf package: pip install 'pytest-merge-harness[gguf]'"
        )
    return Request(
        merged=inputs["merged_model"],
        base=inputs["base_model"],
        adapter=inputs["adapter"],
        exports=exports,
        allow_pickle=bool(config.getoption("merge_allow_pickle")),
        trust_remote_code=bool(config.getoption("merge_trust_remote_code")),
        config_path=_file(config, "merge_config"),
        lock_path=_file(config, "merge_lock"),
        update_lock=bool(config.getoption("update_merge_lock")),
        report_path=_file(config, "merge_report"),
        summary_path=_file(config, "merge_summary"),
        overrides={
            knob.name: config.getoption(knob.dest)
            for knob in KNOBS
            if config.getoption(knob.dest) is not None
        },
    )
