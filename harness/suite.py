"""The registry of check families: each contributes a list of :class:`Check` for a run.

A family is a module exposing ``checks(options) -> list[Check]``. Listing it here is all it takes
for its checks to become pytest items, report entries and gate inputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from harness.context import Options
from harness.result import Check

#: family name -> module exposing ``checks(options)``; order is the order items run in.
FAMILIES: dict[str, str] = {
    "structure": "harness.structure",
    "security": "harness.security",
    "weights": "harness.weights",
    "hash": "harness.digest",
    "behaviour": "harness.behaviour",
    "lock": "harness.lock",
    "benchmark": "harness.benchmark",
}


def build_suite(options: Options) -> list[Check]:
    """Every check that applies to ``options``, in a stable order."""
    suite: list[Check] = []
    for family, module_name in FAMILIES.items():
        if options.families is not None and family not in options.families:
            continue
        module = importlib.import_module(module_name)
        provide: Callable[[Options], list[Check]] = module.checks
        suite.extend(provide(options))
    return suite
