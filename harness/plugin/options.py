"""Command-line options and ini keys of the plugin, and their translation into :class:`Options`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.context import Options

GROUP = "merge-harness"

#: (flag, ini key or None, argparse keywords, help)
_PATH_OPTIONS = [
    ("--merged-model", "merged_model", "the merged checkpoint folder to verify"),
    (
        "--base-model",
        "base_model",
        "the base checkpoint folder (default: the adapter's"
        " base_model_name_or_path when it is a local folder)",
    ),
    ("--adapter", "adapter", "the PEFT adapter folder that was merged"),
]


def add_options(parser: pytest.Parser) -> None:
    """Register the option group shown by ``pytest --help`` and the matching ini keys."""
    group = parser.getgroup(GROUP, "merge-harness: verify a merged LoRA/PEFT checkpoint")
    for flag, ini, text in _PATH_OPTIONS:
        group.addoption(flag, dest=ini, metavar="PATH", default=None, help=text)
        parser.addini(ini, f"{text} (relative to the ini file)", type="string", default="")
    group.addoption(
        "--merge-ulp",
        dest="merge_ulp",
        type=float,
        default=None,
        metavar="K",
        help="allowed rounding error of targeted tensors in ULPs of the stored dtype (default 1)",
    )
    group.addoption(
        "--merge-allow-pickle",
        dest="merge_allow_pickle",
        action="store_true",
        default=False,
        help="read pickle .bin checkpoints (with torch.load(weights_only=True) only)",
    )
    group.addoption(
        "--merge-trust-remote-code",
        dest="merge_trust_remote_code",
        action="store_true",
        default=False,
        help="allow configs with auto_map custom code (off: such configs are refused)",
    )
    group.addoption(
        "--merge-device",
        dest="merge_device",
        default=None,
        metavar="DEVICE",
        help="device for forward passes: cpu (default), cuda, cuda:1",
    )
    group.addoption(
        "--merge-dtype",
        dest="merge_dtype",
        default=None,
        metavar="DTYPE",
        help="dtype for the forward-pass comparison (default: fp32 on a CPU for bf16/fp16"
        " checkpoints, else the checkpoint's)",
    )
    group.addoption(
        "--merge-examples",
        dest="merge_examples",
        type=int,
        default=None,
        metavar="N",
        help="hypothesis examples per behaviour property (default 20)",
    )
    group.addoption(
        "--merge-timeout",
        dest="merge_timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fail a check that runs longer than this (default: no limit)",
    )
    group.addoption(
        "--merge-checks",
        dest="merge_checks",
        default=None,
        metavar="FAMILIES",
        help="comma-separated families to run: structure,weights,hash,behaviour,benchmark",
    )
    group.addoption(
        "--merge-config",
        dest="merge_config",
        default=None,
        metavar="FILE",
        help="gate configuration (default: [tool.merge-harness] in pyproject.toml, or"
        " merge-harness.toml)",
    )
    group.addoption(
        "--merge-lock",
        dest="merge_lock",
        default=None,
        metavar="FILE",
        help="lock file of approved digests and results (default: merge-harness.lock beside the"
        " config)",
    )
    group.addoption(
        "--update-merge-lock",
        dest="update_merge_lock",
        action="store_true",
        default=False,
        help="record the digests and benchmark results of this run in the lock file",
    )
    group.addoption(
        "--merge-report",
        dest="merge_report",
        default=None,
        metavar="PATH",
        help="write a JSON report of every check",
    )
    group.addoption(
        "--merge-summary",
        dest="merge_summary",
        default=None,
        metavar="PATH",
        help="write a GitHub-flavoured markdown summary (for $GITHUB_STEP_SUMMARY)",
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


def wanted(config: pytest.Config) -> bool:
    """Whether this run asked for merge checks at all (cheap: no imports beyond options)."""
    return any(_path(config, dest) for _, dest, _ in _PATH_OPTIONS)


def read_options(config: pytest.Config) -> Options:
    """Build :class:`Options` from the command line and ini file; raise UsageError if invalid."""
    options = Options(
        merged=_path(config, "merged_model"),
        base=_path(config, "base_model"),
        adapter=_path(config, "adapter"),
        allow_pickle=bool(config.getoption("merge_allow_pickle")),
        trust_remote_code=bool(config.getoption("merge_trust_remote_code")),
        update_lock=bool(config.getoption("update_merge_lock")),
    )
    for label, path in (
        ("--merged-model", options.merged),
        ("--base-model", options.base),
        ("--adapter", options.adapter),
    ):
        if path is not None and not path.exists():
            raise pytest.UsageError(f"{label} {path}: no such file or folder")
    ulp = config.getoption("merge_ulp")
    if ulp is not None:
        if not ulp >= 0:
            raise pytest.UsageError(f"--merge-ulp must be >= 0, got {ulp}")
        options.ulp_tolerance = float(ulp)
    examples = config.getoption("merge_examples")
    if examples is not None:
        if examples < 1:
            raise pytest.UsageError(f"--merge-examples must be >= 1, got {examples}")
        options.examples = int(examples)
    timeout = config.getoption("merge_timeout")
    if timeout is not None:
        if not timeout > 0:
            raise pytest.UsageError(f"--merge-timeout must be > 0, got {timeout}")
        options.check_timeout = float(timeout)
    device = config.getoption("merge_device")
    if device:
        options.device = str(device)
    dtype = config.getoption("merge_dtype")
    if dtype:
        from harness.dtypes import from_name

        try:
            options.dtype = from_name(str(dtype))
        except KeyError as exc:
            raise pytest.UsageError(f"--merge-dtype: {exc.args[0]}") from None
    families = config.getoption("merge_checks")
    if families:
        from harness.suite import FAMILIES

        chosen = frozenset(f.strip() for f in str(families).split(",") if f.strip())
        unknown = sorted(chosen - set(FAMILIES))
        if unknown:
            raise pytest.UsageError(
                f"--merge-checks: unknown famil{'y' if len(unknown) == 1 else 'ies'}"
                f" {', '.join(unknown)} (known: {', '.join(FAMILIES)})"
            )
        options.families = chosen
    for dest, attr in (
        ("merge_config", "config_path"),
        ("merge_lock", "lock_path"),
        ("merge_report", "report_path"),
        ("merge_summary", "summary_path"),
    ):
        value = config.getoption(dest)
        if value:
            setattr(options, attr, Path(value).expanduser().absolute())
    return options
