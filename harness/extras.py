"""How to install an optional extra, said the way the user installs the harness.

Under the composite GitHub Action (which sets ``MERGE_HARNESS_ACTION``) the fix is an action
input, not a pip command the user cannot run on the runner.
"""

from __future__ import annotations

import os

#: Set by action.yml when the gate runs as the composite action.
ACTION_ENV = "MERGE_HARNESS_ACTION"


def install_hint(extra: str) -> str:
    """``pip install 'pytest-merge-harness[eval]'``, or the action input that installs it."""
    if os.environ.get(ACTION_ENV):
        return f"add {extra} to the action input pip-extras (for example: models,{extra})"
    return f"pip install 'pytest-merge-harness[{extra}]'"
