"""Security checks: a checkpoint must not carry code that a later ``from_pretrained`` would run.

A ``config.json`` with ``auto_map`` points transformers at Python files shipped in the folder;
anyone who loads the merged model with ``trust_remote_code=True`` runs them. The harness itself
never does (it loads with ``trust_remote_code=False`` and never unpickles without opt-in), but a
CI gate that passes such a checkpoint would vouch for code nobody reviewed. The check fails
unless the user allows custom code with ``--merge-trust-remote-code``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.io.files import exists, read_json
from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult, Family
from harness.run.settings import Settings

#: config.json keys through which transformers imports code from the checkpoint folder.
CODE_KEYS = ("auto_map", "custom_pipelines")


def _code_in(folder: Path) -> tuple[list[str], list[str]]:
    """The code-loading config keys and the Python files of one folder."""
    keys: list[str] = []
    config_path = folder / "config.json"
    if exists(config_path):
        config: Any = read_json(config_path)
        if isinstance(config, dict):
            keys = [k for k in CODE_KEYS if config.get(k)]
    scripts = sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
    return keys, scripts


def check_no_remote_code(ctx: Context) -> CheckResult:
    """No ``auto_map`` custom code in the merged (or base) folder unless explicitly allowed."""
    found: list[str] = []
    for label, folder in (("merged", ctx.settings.merged), ("base", ctx.settings.base)):
        if folder is None or not folder.is_dir():
            continue
        keys, scripts = _code_in(folder)
        if keys:
            shipped = f" ({', '.join(scripts)})" if scripts else ""
            found.append(
                f"{folder / 'config.json'} has {' and '.join(keys)} (custom code{shipped})"
            )
        elif scripts:
            found.append(f"{label} folder {folder} ships Python files ({', '.join(scripts)})")
    if not found:
        return CheckResult.passed("no custom code: config.json has no auto_map, no .py files")
    if ctx.settings.trust_remote_code:
        return CheckResult.passed(
            f"custom code allowed by --merge-trust-remote-code: {found[0]}", custom_code=found
        )
    return CheckResult.failed(
        f"{found[0]}; refusing custom code: pass --merge-trust-remote-code to allow",
        found[1:],
        custom_code=found,
    )


def checks(settings: Settings) -> list[Check]:
    """The security family."""
    return [
        Check(
            Family.SECURITY,
            "no_remote_code",
            "no auto_map custom code unless --merge-trust-remote-code",
            check_no_remote_code,
        )
    ]
