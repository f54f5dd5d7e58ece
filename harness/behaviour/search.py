"""The property search: hypothesis draws batches of probes and shrinks a failure to a minimum.

A hypothesis example is a *list* of probes, measured in one forward pass per model (one read
of each model's weights, ``Comparer.measure_all``); the example fails when any of its probes
does. Lists have a fixed size, ``min(--merge-examples, PROBES_PER_PASS)``. The generate phase
measures probes until ``--merge-examples`` of them have been measured (the last list is cut to
fit), skipping lists that bring fewer than a quarter new probes: hypothesis' first examples are
its simplest one (every probe one token ``0``) and near-copies of it, each worth one pass of
every model for one new probe. So the default 20 probes take one pass per model. On a failure
hypothesis shrinks the probes in the list; probes measured before cost nothing (``Comparer``
remembers them), so each step is one pass over the changed ones. The smallest failing probe of
the minimal list is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.behaviour.measure import Figures
from harness.behaviour.models import PROBES_PER_PASS
from harness.behaviour.probe import ProbeInput
from harness.errors import HarnessError, one_line
from harness.offline import private_hypothesis_storage

#: Stop shrinking a failure after this many evaluations (passes) or seconds (the smallest
#: failing input seen so far is reported).
SHRINK_EVALUATIONS = 200
SHRINK_SECONDS = 120.0

Measure = Callable[[Sequence[ProbeInput]], list[Figures]]


@dataclass
class Search:
    """The outcome of a hypothesis search for a probe on which M is out of tolerance."""

    examples: list[Figures] = field(default_factory=list)
    minimal: Figures | None = None
    #: Batches measured (each one forward pass per model).
    evaluations: int = 0
    note: str = ""

    @property
    def worst(self) -> Figures | None:
        """The generated probe that used most of its allowance."""
        return max(self.examples, key=lambda f: f.ratio, default=None)


def _size(probe: ProbeInput) -> tuple[int, int, int, int]:
    return (probe.tokens, probe.batch, probe.length, sum(sum(r) for r in probe.input_ids))


def batches(strategy: Any, examples: int) -> Any:
    """The search's examples: lists of ``min(examples, PROBES_PER_PASS)`` probes."""
    from hypothesis import strategies as st

    size = max(1, min(examples, PROBES_PER_PASS))
    return st.lists(strategy, min_size=size, max_size=size)


def search(measure: Measure, strategy: Any, examples: int) -> Search:
    """Measure ``examples`` probes drawn in batches; on a failure shrink it to a minimal probe.

    ``strategy`` draws single probes. Derandomised (the same inputs every run). Shrinking stops
    after ``SHRINK_EVALUATIONS`` evaluations or ``SHRINK_SECONDS``; the smallest failing probe
    seen so far is then reported. Called from inside a user's own ``@given`` test, the search
    runs in a worker thread of its own: it is an independent property run, not a nested one
    (hypothesis keeps its test context per thread). The worker is reused, since hypothesis sets
    up each new thread with a full garbage collection.
    """
    from hypothesis.control import currently_in_test_context

    if not currently_in_test_context():
        return _search(measure, strategy, examples)
    found: Search = _worker().submit(_search, measure, strategy, examples).result()
    return found


_WORKER: list[Any] = []


def _worker() -> Any:
    """The one thread that runs searches requested from inside a hypothesis test."""
    if not _WORKER:
        from concurrent.futures import ThreadPoolExecutor

        _WORKER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-harness-search"))
    return _WORKER[0]


def _search(measure: Measure, strategy: Any, examples: int) -> Search:
    from hypothesis import HealthCheck, Phase, Verbosity, find, settings
    from hypothesis.errors import HypothesisException, NoSuchExample

    result = Search()
    failing: dict[ProbeInput, Figures] = {}
    measured: set[ProbeInput] = set()
    state = {"first_failure": 0.0, "exhausted": False}

    def fails(batch: list[ProbeInput]) -> bool:
        if state["exhausted"]:
            # out of budget: only already-known failures count, so shrinking ends at once
            return any(p in failing for p in batch)
        if not failing:
            # generating: measure new probes until ``examples`` of them are measured, skipping
            # lists that are mostly repeats (hypothesis starts with its simplest example, every
            # probe one token 0, and near-copies of it): a pass for one new probe is wasted
            fresh = [p for p in dict.fromkeys(batch) if p not in measured]
            room = examples - len(measured)
            if room <= 0 or len(fresh) < min(room, (len(batch) + 3) // 4):
                return False
            batch = [p for p in batch if p in measured] + fresh[:room]
        if not batch:
            return False
        figures = measure(batch)
        new = [f for f in figures if f.probe not in measured]
        measured.update(f.probe for f in figures)
        if new:
            result.evaluations += 1
        if not failing:
            result.examples.extend(new)
        bad = [f for f in figures if not f.ok]
        if not bad:
            return False
        if not failing:
            state["first_failure"] = time.perf_counter()
        failing.update((f.probe, f) for f in bad)
        spent = time.perf_counter() - state["first_failure"]
        if result.evaluations > SHRINK_EVALUATIONS + examples or spent > SHRINK_SECONDS:
            state["exhausted"] = True
            result.note = "shrinking stopped early (budget spent); smallest failure so far shown"
        return True

    config = settings(
        parent=settings.get_profile("ci"),
        max_examples=max(1, examples),
        database=None,
        deadline=None,
        derandomize=True,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
    )
    try:
        with private_hypothesis_storage():  # no .hypothesis/ in the user's folder
            found = find(batches(strategy, examples), fails, settings=config)
        bad = [failing[p] for p in found if p in failing] or [f for f in measure(found) if not f.ok]
        result.minimal = min(bad, key=lambda f: _size(f.probe)) if bad else None
    except NoSuchExample:
        result.minimal = None
    except HypothesisException as exc:  # e.g. flaky outputs on a nondeterministic device
        if not failing:
            raise HarnessError(
                f"the probe search stopped: {type(exc).__name__}: {one_line(exc)}"
            ) from None
        result.minimal = failing[min(failing, key=_size)]
        result.note = f"hypothesis stopped shrinking ({type(exc).__name__})"
    if result.minimal is None and failing:
        result.minimal = failing[min(failing, key=_size)]
    return result
