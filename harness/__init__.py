"""merge-harness: prove a merged LoRA/PEFT checkpoint is the merge it claims to be.

Importing this package imports no torch: pytest imports the plugin entry point on every run,
so the heavy libraries are imported only by the modules that need them, when a check runs.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
