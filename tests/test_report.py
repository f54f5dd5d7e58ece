"""Reports: the README demo run end to end (JSON report against its schema, markdown summary,
JUnit properties, the layer plot), and the pure report functions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path

import pytest

from harness.gate.decide import decide
from harness.gate.markdown import render_markdown
from harness.gate.plot import layer_rows, plot_layers, short_name
from harness.gate.report import build_report, junit_properties
from harness.run.check import Check
from harness.run.result import BenchmarkRecord, CheckResult, Family, Outcome

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "fixtures" / "gate" / "merge-harness.toml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _schema() -> dict:
    text = resources.files("harness").joinpath("schema/report.schema.json").read_text("utf-8")
    return json.loads(text)


def _validate(report: dict) -> None:
    schema = _schema()
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_llama):
    """The README demo: the shipped gate configuration on a tiny merge, in a fresh pytest."""
    folder = tmp_path_factory.mktemp("demo")
    out = folder / "reports"
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(folder),
        "-p",
        "no:cacheprovider",
        f"--merged-model={tiny_llama.merged}",
        f"--base-model={tiny_llama.base}",
        f"--adapter={tiny_llama.adapter}",
        f"--merge-config={DEMO_CONFIG}",
        "--merge-checks=structure,weights,hash,lock,benchmark",
        f"--merge-lock={folder / 'demo.lock'}",
        f"--merge-report={out / 'report.json'}",
        f"--merge-summary={out / 'summary.md'}",
        f"--junitxml={out / 'junit.xml'}",
    ]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    return done, out


def test_demo_runs_a_real_lm_eval_task_offline(demo):
    done, out = demo
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "PASS merge::benchmark::tiny_choice.acc" in done.stdout
    assert "PASS merge::benchmark::perplexity" in done.stdout
    report = json.loads((out / "report.json").read_text())
    acc = {c["id"]: c for c in report["checks"]}["merge::benchmark::tiny_choice.acc"]
    assert acc["metrics"]["n"] == 48 and acc["record"]["reused"] is False
    assert set(acc["record"]["values"]) == {"merged", "adapter"}


def test_report_validates_against_its_schema(demo):
    _, out = demo
    report = json.loads((out / "report.json").read_text())
    _validate(report)
    assert report["schema_version"] == 2 and report["verdict"]["outcome"] == "passed"
    families = {c["family"] for c in report["checks"]}
    assert {"structure", "weights", "hash", "lock", "benchmark"} <= families
    assert set(report["digests"]) == {"merged", "base", "adapter"}
    env = report["environment"]
    assert env["device"] == "cpu" and "torch" in env["versions"] and "lm-eval" in env["versions"]
    # The per-tensor digests of the lock check travel to the lock file, not into the report.
    lock = {c["id"]: c for c in report["checks"]}["merge::lock::digests"]["lock"]
    assert set(lock) == {"path", "status", "changed"}


def test_markdown_summary_is_rendered_from_the_report(demo):
    _, out = demo
    report = json.loads((out / "report.json").read_text())
    summary = (out / "summary.md").read_text()
    assert summary == render_markdown(report)
    assert summary.startswith("## ✅ merge-harness: partial gate passed")
    assert "| ✅ | `merge::benchmark::tiny_choice.acc` |" in summary
    assert "### Benchmarks" in summary and "| Library | Version |" in summary


def test_junit_names_and_properties(demo):
    _, out = demo
    tree = ET.parse(out / "junit.xml")
    # pytest splits the item id merge::<family>::<name> into classname and name.
    cases = {(c.get("classname"), c.get("name")): c for c in tree.iter("testcase")}
    assert ("merge.lock", "digests") in cases and ("merge.structure", "loads") in cases
    case = cases[("merge.benchmark", "tiny_choice.acc")]
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["merge.family"] == "benchmark" and props["merge.outcome"] == "passed"
    assert props["merge.metric.n"] == "48" and props["merge.metric.reused"] == "False"
    assert props["merge.message"].startswith("acc ")


def test_layer_plot_is_written_beside_the_report(demo):
    _, out = demo
    report = json.loads((out / "report.json").read_text())
    plot = Path(report["artifacts"]["plot"])
    assert plot == out / "report-layers.png"
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and plot.stat().st_size > 10_000


def test_layer_plot_shows_faulty_layers(demo, tmp_path):
    pytest.importorskip("matplotlib")
    _, out = demo
    report = json.loads((out / "report.json").read_text())
    results = [CheckResult.from_json(c) for c in report["checks"] if c["outcome"] != "not_run"]
    rows = layer_rows(results)
    assert rows and all(r["ratio"] == pytest.approx(1.0, abs=1e-3) for r in rows)
    # The same table as a broken merge would give it: one layer skipped, one merged twice.
    rows[2] = {**rows[2], "found_norm": 0.0, "ratio": 0.0}
    rows[5] = {**rows[5], "found_norm": 2 * rows[5]["expected_norm"], "ratio": 2.0}
    path = plot_layers(rows, tmp_path / "faulty.png", title="skipped and doubled layers")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_short_tensor_labels():
    assert short_name("model.layers.3.self_attn.q_proj.weight") == "3.q_proj"
    assert short_name("transformer.h.11.attn.c_attn.weight") == "11.c_attn"
    assert short_name("lm_head.weight") == "lm_head"


# ----------------------------------------------------------------------------- pure functions


def _suite() -> tuple[list[Check], dict[str, CheckResult]]:
    suite = [
        Check(Family.STRUCTURE, "loads", "loads", lambda ctx: CheckResult.passed("")),
        Check(Family.BENCHMARK, "t.acc", "acc", lambda ctx: CheckResult.passed("")),
        Check(Family.HASH, "never", "deselected", lambda ctx: CheckResult.passed("")),
    ]
    failed = CheckResult.failed("merged | base differ", ["worst: x | y"], worst="a" * 64)
    failed.digests = {"merged": "a" * 64}
    inconclusive = CheckResult(Outcome.INCONCLUSIVE, "acc 0.5 on 6 docs")
    inconclusive.record = BenchmarkRecord("f" * 64, {}, float("nan"), {"merged": 0.5}, True)
    results = {"merge::structure::loads": failed, "merge::benchmark::t.acc": inconclusive}
    return suite, results


def test_report_of_a_failed_run_validates_and_renders():
    suite, results = _suite()
    verdict = decide(suite, results, inconclusive_blocks=False)
    report = build_report(suite, results, None, verdict, created="2025-01-01T00:00:00+00:00")
    _validate(report)
    assert report["verdict"]["outcome"] == "failed"
    assert report["checks"][2]["outcome"] == "not_run"
    assert report["checks"][1]["record"]["value"] == "nan"
    assert report["digests"] == {"merged": "a" * 64}
    markdown = render_markdown(report)
    assert markdown.startswith("## ❌ merge-harness: gate failed")
    assert "- merge::structure::loads: merged \\| base differ" in markdown
    assert "| ❔ | `t.acc` | 0.5 |" in markdown and "♻️ reused" in markdown
    assert "worst: x | y" in markdown  # figures are shown verbatim in a code block


def test_junit_properties_are_flat_scalars():
    suite, results = _suite()
    props = dict(junit_properties(suite[0], results["merge::structure::loads"]))
    assert props["merge.outcome"] == "failed" and props["merge.family"] == "structure"
    assert props["merge.metric.worst"] == "a" * 64
    assert "merge.metric._private" not in props
