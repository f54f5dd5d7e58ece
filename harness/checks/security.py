"""Security checks: a checkpoint must not carry code that a later ``from_pretrained`` would run.

An ``auto_map`` points transformers at Python files shipped in the folder; anyone who loads the
merged model, its tokenizer or its processor with ``trust_remote_code=True`` runs them. Every
configuration file a loader reads is in scope (:mod:`harness.io.code`): ``config.json``, but
also ``tokenizer_config.json``, ``processor_config.json``, ``generation_config.json`` and the
others, in the merged, base and adapter folders. The harness itself never runs such code (it
loads with ``trust_remote_code=False`` and never unpickles without opt-in), but a CI gate that
passes such a checkpoint would vouch for code nobody reviewed. The check fails unless the user
allows custom code with ``--merge-trust-remote-code``.
"""

from __future__ import annotations

from harness.io.code import custom_code, scripts
from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult, Family
from harness.run.settings import Settings


def check_no_remote_code(ctx: Context) -> CheckResult:
    """No ``auto_map`` custom code in the merged, base or adapter folder unless allowed."""
    found: list[str] = []
    settings = ctx.settings
    for label, folder in (
        ("merged", settings.merged), ("base", settings.base), ("adapter", settings.adapter),
    ):
        if folder is None or not folder.is_dir():
            continue
        named = custom_code(folder)
        shipped = scripts(folder)
        code = f" (custom code ({', '.join(shipped)}))" if shipped else " (custom code)"
        for entry in named:
            found.append(f"{entry.file} has {' and '.join(entry.keys)}{code}")
        if shipped and not named:
            found.append(f"{label} folder {folder} ships Python files ({', '.join(shipped)})")
    if not found:
        return CheckResult.passed(
            "no custom code: no configuration file has auto_map, no .py files"
        )
    if settings.trust_remote_code:
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
