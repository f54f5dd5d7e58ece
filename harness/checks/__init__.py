"""The registry of check families: each contributes a list of :class:`Check` for a run.

A family is a module exposing ``checks(settings) -> list[Check]``. Listing it here is all it
takes for its checks to become pytest items, report entries and gate inputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from harness.run.check import Check
from harness.run.result import Family
from harness.run.settings import Settings

#: family -> module exposing ``checks(settings)``; order is the order items run in.
FAMILIES: dict[Family, str] = {
    Family.STRUCTURE: "harness.checks.structure",
    Family.SECURITY: "harness.checks.security",
    Family.WEIGHTS: "harness.checks.weights",
    Family.HASH: "harness.checks.hash",
    Family.BEHAVIOUR: "harness.checks.behaviour",
    Family.LOCK: "harness.checks.lock",
    Family.BENCHMARK: "harness.checks.benchmark",
    Family.EXPORT: "harness.checks.export",
}


def build_suite(settings: Settings) -> list[Check]:
    """Every check that applies to ``settings``, in a stable order.

    Part K > 1 of a sharded run (``--merge-shard K/N``) holds the streamed checks only; the
    others run once, in part 1.
    """
    suite: list[Check] = []
    for family, module_name in FAMILIES.items():
        if not settings.runs(family):
            continue
        module = importlib.import_module(module_name)
        provide: Callable[[Settings], list[Check]] = module.checks
        suite.extend(provide(settings))
    if settings.shard is not None and settings.shard[0] > 1:
        suite = [check for check in suite if check.streamed]
    return suite
