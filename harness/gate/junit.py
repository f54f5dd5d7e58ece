"""A JUnit XML file of the checks, for runs that are not pytest sessions (``combine``).

pytest's own ``--junitxml`` writes the file of a pytest run; ``merge-harness combine`` judges
without a pytest session and writes the same shape: one ``<testcase>`` per check, classname
``merge.<family>``, a ``<failure>`` or ``<skipped>`` element with the one-line message, and
the check's figures as ``<property>`` elements (:func:`harness.gate.report.junit_properties`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

from harness.gate.report import junit_properties
from harness.io.output import write_text_atomic
from harness.run.check import Check
from harness.run.result import CheckResult, Outcome


def render_junit(suite: Sequence[Check], results: Mapping[str, CheckResult]) -> str:
    """The JUnit XML text of the checks that produced a result."""
    ran = [(c, results[c.id]) for c in suite if c.id in results]
    failures = sum(r.outcome is Outcome.FAILED for _, r in ran)
    skipped = sum(r.outcome in (Outcome.SKIPPED, Outcome.INCONCLUSIVE) for _, r in ran)
    seconds = sum(r.seconds or 0.0 for _, r in ran)
    root = ET.Element("testsuites")
    suite_element = ET.SubElement(
        root, "testsuite", name="merge-harness", tests=str(len(ran)), failures=str(failures),
        errors="0", skipped=str(skipped), time=f"{seconds:.3f}",
    )
    for check, result in ran:
        case = ET.SubElement(
            suite_element, "testcase", classname=f"merge.{check.family.value}",
            name=check.name, time=f"{result.seconds or 0.0:.3f}",
        )
        properties = ET.SubElement(case, "properties")
        for name, value in junit_properties(check, result):
            ET.SubElement(properties, "property", name=name, value=value)
        if result.outcome is Outcome.FAILED:
            failure = ET.SubElement(case, "failure", message=result.message)
            failure.text = "\n".join([result.message, *result.details])
        elif result.outcome in (Outcome.SKIPPED, Outcome.INCONCLUSIVE):
            ET.SubElement(case, "skipped", message=result.message)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(path: Path, suite: Sequence[Check], results: Mapping[str, CheckResult]) -> None:
    """Write :func:`render_junit` to ``path`` atomically, never through a symlink."""
    write_text_atomic(path, render_junit(suite, results))
