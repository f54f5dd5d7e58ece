"""Command-line options and ini keys of the plugin, and their translation into a ``Request``.

The knobs (``--merge-ulp``, ``--merge-device``...) come from :data:`harness.run.knobs.KNOBS`:
each is parsed by its own typed function, so a bad value is pytest's usage error (exit 4) with
the knob's message, and an option left out stays *unset* (the configuration file may then set
it). Nothing here decides precedence: :func:`harness.run.settings.resolve` does, once.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.errors import HarnessError
from harness.extras import install_hint
from harness.run.knobs import KNOBS, Knob, KnobError
from harness.run.settings import Request
from harness.stream.partition import parse_shard

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


SHARD_FLAG = "--merge-shard"


def _shard(text: str) -> tuple[int, int]:
    """Argparse ``type=`` of ``--merge-shard``."""
    try:
        return parse_shard(text)
    except HarnessError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    group.addoption(
        SHARD_FLAG,
        dest="merge_shard",
        type=_shard,
        default=None,
        metavar="K/N",
        help="compute part K of N of the streamed checks and write it into --merge-report;"
        " merge-harness combine judges the parts together",
    )


def _path(config: pytest.Config, dest: str) -> Path | None:
    value: Any = config.getoption(dest)
    if value:
        return Path(value).expanduser().absolute()
    ini = str(config.getini(dest) or "")
    if ini:
        anchor = config.inipath.parent if config.inipath else config.rootpath
        return (anchor / Path(ini).expanduser()).absolute()
    return None


#: What a Hugging Face Hub id looks like (``owner/name``), as opposed to a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def missing_input(flag: str, path: Path, given: str) -> str:
    """The one-line cause for an input that does not exist (a hub id gets its own advice)."""
    if _HUB_ID.fullmatch(given) and not given.startswith((".", "~")):
        return (
            f"{flag} {given}: no such local folder; it looks like a Hugging Face Hub id, and"
            " merge-harness never downloads: fetch it first (huggingface-cli download"
            f" {given} --local-dir DIR) and pass the folder"
        )
    return f"{flag} {path}: no such file or folder"


def is_adapter_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a PEFT adapter and no model weights of its own."""
    if not (folder / "adapter_config.json").is_file():
        return False
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return not any((folder / name).exists() for name in weights)


def _file(config: pytest.Config, dest: str) -> Path | None:
    value = config.getoption(dest)
    return Path(value).expanduser().absolute() if value else None


def _exports(config: pytest.Config) -> tuple[Path, ...]:
    values: list[str] = config.getoption(EXPORT_OPTION[1]) or []
    return tuple(Path(v).expanduser().absolute() for v in values)


def is_selection(arg: str) -> bool:
    """Whether a positional argument selects merge checks (``merge``, ``merge::weights::x``)."""
    return arg == "merge" or arg.startswith("merge::")


def wanted(config: pytest.Config, namespace: Any, positional: list[str]) -> bool:
    """Whether this run asks for merge checks (cheap: no imports beyond options).

    A merge named on the command line always does. One named only by the ini file does when
    pytest runs the whole project (no positional arguments) or merge checks are selected
    (``pytest merge``); ``pytest tests/test_x.py`` in a project whose ini names a merge runs
    just that file, as pytest users expect.
    """
    if any(getattr(namespace, dest, None) for _, dest, _ in PATH_OPTIONS):
        return True
    if getattr(namespace, EXPORT_OPTION[1], None):
        return True
    if not any(str(config.getini(dest) or "") for _, dest, _ in PATH_OPTIONS):
        return False
    return all(is_selection(arg) for arg in positional)


def read_request(config: pytest.Config) -> Request:
    """The :class:`Request` the command line and ini file make; UsageError if an input is absent."""
    inputs = {dest: _path(config, dest) for _, dest, _ in PATH_OPTIONS}
    for flag, dest, _ in PATH_OPTIONS:
        path = inputs[dest]
        if path is not None and not path.exists():
            given = str(config.getoption(dest) or config.getini(dest))
            raise pytest.UsageError(missing_input(flag, path, given))
    exports = _exports(config)
    for path in exports:
        if not path.is_file():
            raise pytest.UsageError(f"--export {path}: no such file")
    if exports and importlib.util.find_spec("gguf") is None:
        raise pytest.UsageError(f"--export needs the gguf package: {install_hint('gguf')}")
    merged = inputs["merged_model"]
    if merged is not None and is_adapter_folder(merged):
        raise pytest.UsageError(
            f"--merged-model {merged}: this is a PEFT adapter folder (adapter_config.json, no"
            " model weights); did you mean --adapter? The merged model is the folder that"
            " merge_and_unload() and save_pretrained() wrote"
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
        shard=config.getoption("merge_shard"),
        overrides={
            knob.name: config.getoption(knob.dest)
            for knob in KNOBS
            if config.getoption(knob.dest) is not None
        },
    )
