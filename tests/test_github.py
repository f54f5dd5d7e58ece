"""GitHub integration: workflow-command escaping, step summary and step outputs files."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.gate import github


def unescape(text: str) -> str:
    """What the runner does to an escaped value (toolkit's unescapeValue)."""
    return (
        text.replace("%0D", "\r").replace("%0A", "\n").replace("%3A", ":")
        .replace("%2C", ",").replace("%25", "%")
    )


def parse_command(line: str) -> tuple[str, dict[str, str], str]:
    """Split a workflow command like the runner: name, properties, message."""
    assert line.startswith("::")
    head, sep, message = line[2:].partition("::")
    assert sep, line
    name, _, props = head.partition(" ")
    properties = {}
    for pair in filter(None, props.split(",")):
        key, _, value = pair.partition("=")
        properties[key] = unescape(value)
    return name, properties, unescape(message)


ACTIONS = {"GITHUB_ACTIONS": "true"}


def test_escape_data_matches_the_toolkit() -> None:
    assert github.escape_data("50% done\r\nnext: a, b") == "50%25 done%0D%0Anext: a, b"


def test_escape_property_also_escapes_colon_and_comma() -> None:
    assert github.escape_property("merge::weights::a,b 5%") == "merge%3A%3Aweights%3A%3Aa%2Cb 5%25"


def test_percent_is_escaped_first_so_nothing_is_escaped_twice() -> None:
    # A literal "%0A" in the text must come back as "%0A", not as a newline.
    assert github.escape_data("%0A") == "%250A"
    assert unescape(github.escape_data("%0A")) == "%0A"


def test_annotation_line_format() -> None:
    line = github.annotation(
        "error", "tensor 'a' off by 3 ULP\n  worst element 7", title="merge::weights::oracle",
        file="merge-harness.lock",
    )
    assert line == (
        "::error title=merge%3A%3Aweights%3A%3Aoracle,file=merge-harness.lock"
        "::tensor 'a' off by 3 ULP%0A  worst element 7"
    )
    assert "\n" not in line


def test_annotation_omits_empty_properties_and_checks_level() -> None:
    assert github.annotation("warning", "careful") == "::warning::careful"
    assert github.annotation("notice", "n", title="") == "::notice::n"
    with pytest.raises(ValueError, match="level"):
        github.annotation("fatal", "x")


#: Text made of the pieces that matter to the escaping and heredoc rules.
text_with_specials = st.lists(
    st.sampled_from([*"ab:,%=\r\n <>{}'\"é", "%0A", "%25", "::", "ghadelimiter_", "<<"]),
    max_size=30,
).map("".join)


@given(message=text_with_specials, title=text_with_specials)
def test_annotations_round_trip_through_the_runners_parser(message: str, title: str) -> None:
    line = github.annotation("error", message, title=title or None)
    assert "\n" not in line and "\r" not in line
    name, properties, parsed = parse_command(line)
    assert name == "error"
    assert parsed == message
    assert properties.get("title", "") == title


def report_with(*checks: dict[str, object]) -> dict[str, object]:
    return {"checks": list(checks)}


def test_report_annotations_cover_failures_and_inconclusive_only() -> None:
    report = report_with(
        {"id": "merge::structure::loads", "outcome": "passed", "message": "ok"},
        {"id": "merge::hash::differs_from_base", "outcome": "failed",
         "message": "merged weights are identical to the base", "details": ["digest aff531dd"]},
        {"id": "merge::benchmark::arc", "outcome": "inconclusive", "message": "n=20 too small"},
        {"id": "merge::structure::index_valid", "outcome": "skipped", "message": "single file"},
    )
    lines = github.report_annotations(report)
    assert [parse_command(line) for line in lines] == [
        ("error", {"title": "merge::hash::differs_from_base"},
         "merged weights are identical to the base\ndigest aff531dd"),
        ("warning", {"title": "merge::benchmark::arc"}, "n=20 too small"),
    ]


def test_report_annotations_keep_the_first_lines_of_long_figures() -> None:
    details = [f"tensor {i}: off" for i in range(20)]
    report = report_with({"id": "merge::weights::x", "outcome": "failed", "message": "bad",
                          "details": details})
    _, _, message = parse_command(github.report_annotations(report)[0])
    assert message.splitlines() == [
        "bad", *details[: github.MAX_DETAIL_LINES], "... 12 more line(s) in the job summary"
    ]


def test_report_annotations_roll_up_beyond_githubs_limit() -> None:
    checks = [
        {"id": f"merge::weights::t{i}", "outcome": "failed", "message": f"bad {i}"}
        for i in range(13)
    ]
    lines = github.report_annotations(report_with(*checks), limit=10)
    assert len(lines) == 10
    _, props, message = parse_command(lines[-1])
    assert props["title"] == "merge-harness"
    assert message.startswith("4 more check(s) failed: merge::weights::t9, merge::weights::t10")


def test_report_annotations_anchor_checks_to_files() -> None:
    report = report_with(
        {"id": "merge::hash::lock", "outcome": "failed", "message": "merged digest changed"},
        {"id": "merge::structure::loads", "outcome": "failed", "message": "no weights"},
    )
    lines = github.report_annotations(report, files={"merge::hash::lock": "merge-harness.lock"})
    assert [parse_command(line)[1] for line in lines] == [
        {"title": "merge::hash::lock", "file": "merge-harness.lock"},
        {"title": "merge::structure::loads"},
    ]


def test_emit_writes_lines_and_flushes() -> None:
    out = io.StringIO()
    github.emit(["::error::a", "::warning::b"], out)
    assert out.getvalue() == "::error::a\n::warning::b\n"


def test_writers_do_nothing_outside_actions(tmp_path) -> None:
    summary, output = tmp_path / "summary.md", tmp_path / "output"
    env = {"GITHUB_STEP_SUMMARY": str(summary), "GITHUB_OUTPUT": str(output)}
    assert not github.in_actions(env)
    assert github.append_summary("# hi", env) is None
    assert github.write_outputs({"outcome": "passed"}, env) is None
    assert not summary.exists() and not output.exists()
    assert github.in_actions({"GITHUB_ACTIONS": "true"})
    assert not github.in_actions({"GITHUB_ACTIONS": "false"})


def test_append_summary_appends(tmp_path) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    env = {**ACTIONS, "GITHUB_STEP_SUMMARY": str(summary)}
    assert github.append_summary("## merge-harness\n| a | b |", env) == summary
    assert summary.read_text() == "earlier step\n## merge-harness\n| a | b |\n"


def test_append_summary_truncates_below_githubs_limit(tmp_path) -> None:
    summary = tmp_path / "summary.md"
    env = {**ACTIONS, "GITHUB_STEP_SUMMARY": str(summary)}
    github.append_summary("| row |\n" * 200_000, env)
    text = summary.read_text()
    assert len(text.encode()) < github.SUMMARY_LIMIT
    assert text.endswith("see the reports.*\n")
    assert "| row |\n\n*merge-harness: summary truncated" in text


def test_outputs_are_multiline_safe(tmp_path) -> None:
    output = tmp_path / "output"
    output.write_text("earlier=1\n")
    env = {**ACTIONS, "GITHUB_OUTPUT": str(output)}
    values = {"outcome": "failed", "report": "/a b/merge-report.json", "text": "x=1\ny<<EOF\nEOF"}
    github.write_outputs(values, env)
    assert github.parse_outputs(output.read_text()) == {"earlier": "1", **values}
    assert re.search(r"^outcome<<ghadelimiter_[0-9a-f]{32}$", output.read_text(), re.M)


@given(value=text_with_specials)
def test_any_output_value_round_trips(value: str) -> None:
    entry = github.format_output("value", value)
    assert github.parse_outputs(entry) == {"value": value}


@pytest.mark.parametrize("name", ["", "a=b", "a\nb", "a<<b"])
def test_bad_output_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="output name"):
        github.format_output(name, "x")
