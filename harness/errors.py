"""The harness's own error types: each carries a one-line cause that names the file."""

from __future__ import annotations


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
