"""The property search: hypothesis draws probes, and shrinks a failure to a minimal input."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.behaviour.measure import Figures
from harness.behaviour.probe import ProbeInput
from harness.errors import HarnessError, one_line
from harness.offline import private_hypothesis_storage

#: Stop shrinking a failure after this many evaluations or seconds (the smallest failing input
#: seen so far is reported).
SHRINK_EVALUATIONS = 200
SHRINK_SECONDS = 120.0


@dataclass
class Search:
    """The outcome of a hypothesis search for a probe on which M is out of tolerance."""

    examples: list[Figures] = field(default_factory=list)
    minimal: Figures | None = None
    evaluations: int = 0
    note: str = ""

    @property
    def worst(self) -> Figures | None:
        """The generated probe that used most of its allowance."""
        return max(self.examples, key=lambda f: f.ratio, default=None)


def _size(probe: ProbeInput) -> tuple[int, int, int, int]:
    return (probe.tokens, probe.batch, probe.length, sum(sum(r) for r in probe.input_ids))


def search(measure: Callable[[ProbeInput], Figures], strategy: Any, examples: int) -> Search:
    """Draw up to ``examples`` probes; on a failure shrink it to a minimal failing probe.

    Derandomised (the same inputs every run). Shrinking stops after ``SHRINK_EVALUATIONS``
    evaluations or ``SHRINK_SECONDS``; the smallest failing probe seen so far is then reported.
    Called from inside a user's own ``@given`` test, the search runs in a worker thread of its
    own: it is an independent property run, not a nested one (hypothesis keeps its test context
    per thread). The worker is reused, since hypothesis sets up each new thread with a full
    garbage collection.
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


def _search(measure: Callable[[ProbeInput], Figures], strategy: Any, examples: int) -> Search:
    from hypothesis import HealthCheck, Phase, Verbosity, find, settings
    from hypothesis.errors import HypothesisException, NoSuchExample

    result = Search()
    failing: dict[ProbeInput, Figures] = {}
    state = {"first_failure": 0.0, "exhausted": False}

    def fails(probe: ProbeInput) -> bool:
        if state["exhausted"]:
            # out of budget: only already-known failures count, so shrinking ends at once
            return probe in failing
        figures = measure(probe)
        result.evaluations += 1
        if not failing:
            result.examples.append(figures)
        if figures.ok:
            return False
        if not failing:
            state["first_failure"] = time.perf_counter()
        failing[probe] = figures
        spent = time.perf_counter() - state["first_failure"]
        if len(failing) and (
            result.evaluations > SHRINK_EVALUATIONS + examples or spent > SHRINK_SECONDS
        ):
            state["exhausted"] = True
            result.note = "shrinking stopped early (budget spent); smallest failure so far shown"
        return True

    config = settings(
        parent=settings.get_profile("ci"),
        max_examples=examples,
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
            found = find(strategy, fails, settings=config)
        result.minimal = failing.get(found) or measure(found)
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

