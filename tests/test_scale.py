"""The streamed pass divided: partitions, parts to JSON and back, combine, xdist and CI shards.

Every comparison is with the single-process run on the same real merge: the divided pass must
give the same per-tensor verdicts, digests, NaN/Inf findings and diagnoses, for the correct
merge and for every fault kind the suite injects.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.checkpoints import copy_checkpoint, rewrite
from support.faults import FAULTS, inject

from harness.case import MergeCase
from harness.checks.split import Divided
from harness.cli import main
from harness.errors import HarnessError
from harness.oracle.compare import Role, TensorCheck, Worst
from harness.oracle.parts import (
    PartResult,
    check_from_json,
    check_to_json,
    combine_parts,
)
from harness.oracle.stream import run_oracle
from harness.run.context import Context
from harness.run.settings import Settings
from harness.stream.partition import Unit, parse_shard, plan_parts, units

CHECKS = "--merge-checks=structure,weights,hash"
#: Fault kinds beyond the delta faults of ``support.faults``.
KINDS = ("good", *FAULTS, "nan", "missing", "noop")


# ---- the plan ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0/4", "5/4", "a/b", "2", "2/0", ""])
def test_a_bad_shard_is_refused(text: str) -> None:
    with pytest.raises(HarnessError, match="shard"):
        parse_shard(text)


def test_a_shard_is_read() -> None:
    assert parse_shard(" 2 / 4 ") == (2, 4)


def _units(sizes: list[int], files: list[str]) -> list[Unit]:
    return [Unit((f"t{i}",), file, size) for i, (size, file) in
            enumerate(zip(sizes, files, strict=True))]


@given(
    st.lists(st.integers(1, 10_000), min_size=1, max_size=60),
    st.integers(1, 8),
    st.integers(1, 6),
)
def test_parts_cover_every_tensor_once_in_file_order(
    sizes: list[int], count: int, files: int
) -> None:
    names = [f"f{i * files // len(sizes)}" for i in range(len(sizes))]
    merged = _units(sizes, names)
    parts = plan_parts(merged, [], count)
    assert [p.index for p in parts] == list(range(1, count + 1))
    seen = [n for p in parts for n in sorted(p.names, key=lambda n: int(n[1:]))]
    assert seen == [u.names[0] for u in merged]  # contiguous runs, in order, each once
    assert sum(p.nbytes for p in parts) == sum(sizes)
    if len(set(names)) >= count:
        # enough files: no file is split between two parts
        for file in set(names):
            owners = {p.index for p in parts for u in merged if u.file == file and
                      u.names[0] in p.names}
            assert len(owners) == 1


def test_parts_are_balanced_by_bytes() -> None:
    merged = _units([100] * 40, ["a"] * 40)
    parts = plan_parts(merged, _units([50] * 8, ["b"] * 8), 4)
    assert [p.nbytes for p in parts] == [1100] * 4


def test_a_group_is_never_divided() -> None:
    listed = [(f"t{i}", "a", 10) for i in range(10)]
    grouped = units(listed, groups=[["t3", "t7"]])
    parts = plan_parts(grouped, [], 5)
    holders = [p.index for p in parts if "t3" in p.names or "t7" in p.names]
    assert len(holders) == 1


# ---- parts as JSON ----------------------------------------------------------------------------

floats = st.floats(allow_nan=True, allow_infinity=True)


@given(
    st.builds(
        TensorCheck,
        name=st.text(min_size=1, max_size=20),
        role=st.sampled_from(list(Role)),
        dtype=st.sampled_from(["F32", "BF16", "F16"]),
        numel=st.integers(0, 10**9),
        edits=st.lists(st.text(max_size=10), max_size=3),
        failed=st.integers(0, 10**9),
        max_ulp=floats,
        bound_use=floats,
        worst=st.none() | st.builds(Worst, st.tuples(st.integers(0, 99), st.integers(0, 99)),
                                    floats, floats, floats, floats, floats),
        diagnosis=st.none() | st.text(max_size=30),
    )
)
def test_a_tensor_verdict_survives_json_exactly(check: TensorCheck) -> None:
    text = json.dumps(check_to_json(check), allow_nan=False)
    back = check_from_json(json.loads(text))

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, float) and math.isnan(a):
            return isinstance(b, float) and math.isnan(b)
        return bool(a == b)

    for key in check_to_json(check):
        left, right = getattr(check, key), getattr(back, key)
        if isinstance(left, Worst):
            assert isinstance(right, Worst)
            assert all(same(getattr(left, k), getattr(right, k)) for k in vars(left))
        else:
            assert same(left, right), key


# ---- the divided pass equals the whole one, in process -----------------------------------------


def _faulty(kind: str, case: MergeCase, folder: Path) -> Path:
    """The merge of ``case`` with fault ``kind`` (``good``: the merge itself)."""
    assert case.base is not None
    if kind == "good":
        return case.merged
    shutil.rmtree(folder, ignore_errors=True)
    if kind in FAULTS:
        return inject(case.merged, case.base, kind, folder)
    copy_checkpoint(case.merged, folder)
    if kind == "noop":
        # the adapter never applied: the base's weights under the merged name
        for file in case.base.glob("*.safetensors"):
            shutil.copy(file, folder / file.name)
        return folder

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        name = "model.layers.1.self_attn.q_proj.weight"
        if kind == "nan":
            tensors[name] = tensors[name].clone()
            tensors[name][0, 0] = float("nan")
        else:  # missing: a targeted tensor dropped
            del tensors[name]

    rewrite(folder, edit)
    return folder


def _whole(case: MergeCase, merged: Path) -> dict[str, Any]:
    assert case.base is not None and case.adapter is not None
    from harness.io.adapter import Adapter
    from harness.io.checkpoint import Checkpoint

    result, merged_scan, base_scan = run_oracle(
        Checkpoint.open(merged), Checkpoint.open(case.base), [Adapter.open(case.adapter)]
    )
    assert merged_scan is not None and base_scan is not None
    return {
        "tensors": [check_to_json(t) for t in result.tensors],
        "notes": result.notes,
        "problem": result.problem,
        "merged": merged_scan.manifest.digest,
        "base": base_scan.manifest.digest,
        "nonfinite": sorted(merged_scan.nonfinite),
    }


def _divided(case: MergeCase, merged: Path, count: int) -> dict[str, Any]:
    ctx = Context(Settings(merged=merged, base=case.base, adapter=case.adapter))
    divided = Divided(ctx, count, None)
    # every part travels as JSON, as it does between processes and jobs
    parts = [
        (f"p{p.index}", PartResult.from_json(json.loads(json.dumps(divided.compute(p).to_json()))))
        for p in reversed(divided.parts)
    ]
    combined = combine_parts(parts)
    assert combined.oracle is not None and combined.base is not None
    assert divided.oracle is not None
    divided.oracle.finish(combined.oracle)
    return {
        "tensors": [check_to_json(t) for t in combined.oracle.tensors],
        "notes": combined.oracle.notes,
        "problem": combined.oracle.problem,
        "merged": combined.merged.manifest.digest,
        "base": combined.base.manifest.digest,
        "nonfinite": sorted(combined.merged.nonfinite),
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("count", [2, 4])
def test_divided_pass_equals_the_whole_pass(
    kind: str, count: int, tiny_llama_bf16: MergeCase, tmp_path: Path
) -> None:
    merged = _faulty(kind, tiny_llama_bf16, tmp_path / kind)
    whole = _whole(tiny_llama_bf16, merged)
    assert _divided(tiny_llama_bf16, merged, count) == whole
    if kind != "good":
        assert any(t["failed"] or t["unchanged"] for t in whole["tensors"]) or whole["nonfinite"]


@pytest.mark.parametrize("count", [3, 4])
@pytest.mark.parametrize("kind", ["good", *FAULTS])
def test_divided_pass_of_a_sharded_checkpoint_equals_the_whole(
    kind: str, count: int, tiny_llama_sharded: MergeCase, tmp_path: Path
) -> None:
    merged = _faulty(kind, tiny_llama_sharded, tmp_path / kind)
    case = tiny_llama_sharded
    assert len(list(merged.glob("*.safetensors"))) == 3
    if count == 3:
        # as many parts as files: each part reads whole files, and only its own
        ctx = Context(Settings(merged=merged, base=case.base, adapter=case.adapter))
        checkpoint = ctx.merged()
        for part in Divided(ctx, count, 1).parts:
            files = {checkpoint.tensors[n].file.name for n in part.names}
            assert len(files) == 1
    assert _divided(case, merged, count) == _whole(case, merged)


# ---- combine refuses parts that are not one whole plan ----------------------------------------


@pytest.fixture(scope="module")
def parts(tiny_llama_bf16: MergeCase) -> list[tuple[str, PartResult]]:
    ctx = Context(Settings(merged=tiny_llama_bf16.merged, base=tiny_llama_bf16.base,
                           adapter=tiny_llama_bf16.adapter))
    divided = Divided(ctx, 3, 1)
    return [(f"p{p.index}.json", divided.compute(p)) for p in divided.parts]


def _copy(part: PartResult, **changes: Any) -> PartResult:
    data = part.to_json()
    data.update(changes)
    return PartResult.from_json(data)


def test_parts_in_any_order_combine(parts: list[tuple[str, PartResult]]) -> None:
    combined = combine_parts(list(reversed(parts)))
    assert combined.parts == {p.label: len(p.names) for _, p in parts}


@pytest.mark.parametrize(
    ("mangle", "cause"),
    [
        (lambda ps: ps[:2], r"part 3/3 missing \(have 1, 2 of 3\)"),
        (lambda ps: [*ps, ps[0]], r"part 1/3 given twice \(p1.json, p1.json\)"),
        (lambda ps: [ps[0], ps[1], ("p3.json", _copy(ps[2][1], count=4, index=3))],
         "parts of different splits"),
        (lambda ps: [ps[0], ps[1], ("p3.json", _copy(ps[2][1], plan="0" * 64))],
         "cut from other inputs"),
        (lambda ps: [ps[0], ps[1], ("p3.json", _copy(ps[2][1], names=ps[2][1].names[1:]))],
         "a tensor covered by no part"),
        (lambda ps: [ps[0], ps[1], ("p3.json", _copy(ps[2][1], names=[*ps[2][1].names,
                                                                      ps[0][1].names[0]]))],
         "covered twice"),
        (lambda ps: [ps[0], ps[1], ("p3.json", _copy(ps[2][1], k=2.0))],
         "other adapters or tolerances"),
        (lambda ps: [], "no parts to combine"),
    ],
)
def test_combine_refuses_parts_that_are_not_one_plan(
    parts: list[tuple[str, PartResult]], mangle: Any, cause: str
) -> None:
    with pytest.raises(HarnessError, match=cause):
        combine_parts(mangle(parts))


@pytest.mark.parametrize(
    ("edit", "cause"),
    [
        (lambda d: d.pop("names"), "no 'names' field"),
        (lambda d: d.update(tensors=[{"name": "x", "role": "sideways"}]), "a malformed field"),
        (lambda d: d.update(index=7), "part 7/3 does not exist"),
    ],
)
def test_a_corrupt_part_is_named(
    parts: list[tuple[str, PartResult]], edit: Any, cause: str
) -> None:
    data = parts[0][1].to_json()
    edit(data)
    with pytest.raises(HarnessError, match=cause):
        PartResult.from_json(data)


# ---- CI shards: --merge-shard K/N and merge-harness combine -----------------------------------


def _gate(pytester: pytest.Pytester, case: MergeCase, merged: Path, *extra: str
          ) -> pytest.RunResult:
    return pytester.runpytest(
        "-p", "no:randomly", CHECKS, f"--merged-model={merged}", f"--base-model={case.base}",
        f"--adapter={case.adapter}", *extra,
    )


def _view(report: dict[str, Any]) -> dict[str, Any]:
    """What must agree between a combined and a single run (timings and paths aside)."""
    verdict = {k: v for k, v in report["verdict"].items() if k not in ("exit_status", "counts")}
    checks = {
        c["id"]: (c["outcome"], c["message"], c["details"], c["layers"], c["digests"])
        for c in report["checks"]
        if c["id"] != "merge::structure::parts"
    }
    return {"verdict": verdict, "digests": report["digests"], "checks": checks}


def _combine(folder: Path, *args: str) -> tuple[int, dict[str, Any]]:
    report = folder / "combined.json"
    status = main(["combine", *args, f"--merge-report={report}"])
    return status, json.loads(report.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_combined_shards_equal_the_unsharded_run(
    kind: str, pytester: pytest.Pytester, tiny_llama_bf16: MergeCase, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    case = tiny_llama_bf16
    merged = _faulty(kind, case, tmp_path / kind)
    whole = _gate(pytester, case, merged, f"--merge-report={tmp_path / 'whole.json'}")
    names = []
    for index in range(1, 5):
        part = tmp_path / f"part-{index}.json"
        result = _gate(pytester, case, merged, f"--merge-shard={index}/4",
                       f"--merge-report={part}")
        assert "gate: part" in result.stdout.str()
        names.append(str(part))
        report = json.loads(part.read_text())
        assert report["verdict"]["outcome"] in ("part", "failed")
        assert report["part"] is not None
    status, combined = _combine(tmp_path, *names)
    single = json.loads((tmp_path / "whole.json").read_text())
    assert _view(combined) == _view(single)
    assert status == whole.ret
    assert (status == 0) == (kind == "good")
    assert "merge::structure::parts" in capsys.readouterr().out


@pytest.fixture(scope="module")
def shard_reports(
    tiny_llama_bf16: MergeCase, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Reports of parts 1..3 of 3 of the good merge, and part 3 of a faulty one."""
    folder = tmp_path_factory.mktemp("shards")
    case = tiny_llama_bf16
    faulty = _faulty("scale", case, folder / "faulty")
    found: dict[str, Path] = {}
    for name, merged, index in (("p1", case.merged, 1), ("p2", case.merged, 2),
                                ("p3", case.merged, 3), ("other", faulty, 3)):
        found[name] = folder / f"{name}.json"
        status = main_pytest(folder, merged, case, f"--merge-shard={index}/3",
                             f"--merge-report={found[name]}")
        assert status == 0
    return found


def main_pytest(cwd: Path, merged: Path, case: MergeCase, *extra: str) -> int:
    """A gate run in a child process, from the reports' folder (no cache, no conftest)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         "--noconftest", CHECKS, f"--merged-model={merged}", f"--base-model={case.base}",
         f"--adapter={case.adapter}", *extra],
        cwd=cwd, capture_output=True, text=True, timeout=600, check=False,
    )
    return done.returncode


def _edited(source: Path, target: Path, edit: Any) -> str:
    data = json.loads(source.read_text())
    edit(data)
    target.write_text(json.dumps(data))
    return str(target)


@pytest.mark.parametrize(
    ("inputs", "cause"),
    [
        (lambda r, t: [r["p1"], r["p2"]], "part 3/3 missing (have 1, 2 of 3)"),
        (lambda r, t: [r["p1"], r["p2"], r["p2"], r["p3"]], "part 2/3 given twice"),
        (lambda r, t: [r["p1"], r["p2"], r["other"]],
         "other.json and p1.json were run on other inputs or settings (they differ in merged)"),
        (lambda r, t: [r["p1"], r["p2"], _edited(
            r["p3"], t / "old.json", lambda d: d.update(harness_version="0.0.1"))],
         "old.json was written by merge-harness 0.0.1"),
        (lambda r, t: [r["p1"], r["p2"], _edited(
            r["p3"], t / "cut.json", lambda d: None) and _truncate(t / "cut.json")],
         "cut.json is corrupt: malformed JSON"),
        (lambda r, t: [r["p1"], r["p2"], _edited(
            r["p3"], t / "lost.json", lambda d: d.update(part=None))],
         "part 3/3 (lost.json) was not computed"),
        (lambda r, t: [r["p1"], r["p2"], _edited(
            r["p3"], t / "edited.json", lambda d: d["part"]["names"].pop())],
         "the parts do not cover the plan they were cut from"),
    ],
    ids=["missing", "duplicated", "other-inputs", "other-version", "truncated", "not-computed",
         "edited"],
)
def test_combine_fails_with_one_line_naming_the_cause(
    shard_reports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    inputs: Any, cause: str,
) -> None:
    names = [str(p) for p in inputs(shard_reports, tmp_path)]
    status, report = _combine(tmp_path, *names)
    assert status == 1
    out = capsys.readouterr().out
    assert cause in out
    entry = next(c for c in report["checks"] if c["id"] == "merge::structure::parts")
    assert entry["outcome"] == "failed"
    assert cause in entry["message"]
    assert "\n" not in entry["message"] and "Traceback" not in out
    assert report["verdict"]["outcome"] == "failed"


def _truncate(path: Path) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def test_combine_writes_the_outputs_a_run_writes(
    shard_reports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary, junit = tmp_path / "summary.md", tmp_path / "junit.xml"
    status = main(["combine", str(shard_reports["p1"]), str(shard_reports["p2"]),
                   str(shard_reports["p3"]), f"--merge-summary={summary}",
                   f"--junitxml={junit}"])
    assert status == 0
    assert "partial gate passed" in summary.read_text()
    xml = junit.read_text()
    assert 'name="targeted_match_reference"' in xml and "<failure" not in xml
    assert "partial gate: PASSED" in capsys.readouterr().out


def test_a_shard_needs_a_report(pytester: pytest.Pytester, tiny_llama_bf16: MergeCase) -> None:
    result = _gate(pytester, tiny_llama_bf16, tiny_llama_bf16.merged, "--merge-shard=1/2")
    assert result.ret == 4
    assert "--merge-shard needs --merge-report" in result.stderr.str()


def test_a_shard_cannot_update_the_lock(
    pytester: pytest.Pytester, tiny_llama_bf16: MergeCase
) -> None:
    result = _gate(pytester, tiny_llama_bf16, tiny_llama_bf16.merged, "--merge-shard=1/2",
                   "--merge-report=r.json", "--update-merge-lock")
    assert result.ret == 4
    assert "pass --update-merge-lock to merge-harness combine" in result.stderr.str()


def test_parts_beyond_the_first_hold_only_streamed_checks(
    shard_reports: dict[str, Path],
) -> None:
    first = json.loads(shard_reports["p1"].read_text())
    second = json.loads(shard_reports["p2"].read_text())
    assert "merge::structure::loads" in {c["id"] for c in first["checks"]}
    assert {c["id"] for c in second["checks"]} == {
        "merge::structure::all_finite", "merge::hash::differs_from_base",
        *(c["id"] for c in first["checks"] if c["family"] == "weights"),
    }


# ---- pytest-xdist: the workers divide one pass ------------------------------------------------


@pytest.mark.parametrize("kind", ["good", "scale"])
def test_xdist_workers_share_one_pass_and_agree_with_one_process(
    kind: str, pytester: pytest.Pytester, tiny_llama_bf16: MergeCase, tmp_path: Path
) -> None:
    case = tiny_llama_bf16
    merged = _faulty(kind, case, tmp_path / kind)
    args = ["-p", "no:randomly", CHECKS, f"--merged-model={merged}",
            f"--base-model={case.base}", f"--adapter={case.adapter}"]
    single = pytester.runpytest_subprocess(*args, f"--merge-report={tmp_path / 'one.json'}")
    shared = pytester.runpytest_subprocess(*args, "-n", "2",
                                           f"--merge-report={tmp_path / 'two.json'}")
    assert shared.ret == single.ret == (0 if kind == "good" else 1)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert _view(two) == _view(one)
    # the workers read each tensor once between them: the pass's bytes are the single run's
    read = [c["metrics"].get("bytes_read") for c in two["checks"]
            if c["id"] == "merge::weights::targeted_match_reference"]
    single_read = [c["metrics"].get("bytes_read") for c in one["checks"]
                   if c["id"] == "merge::weights::targeted_match_reference"]
    assert read == single_read


def test_part_and_combined_reports_follow_the_schema(
    shard_reports: dict[str, Path], tmp_path: Path
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json.loads(
        resources.files("harness").joinpath("schema/report.schema.json").read_text("utf-8")
    )
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    status, combined = _combine(tmp_path, *(str(shard_reports[k]) for k in ("p1", "p2", "p3")))
    assert status == 0
    for report in (json.loads(shard_reports["p2"].read_text()), combined):
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(report)]
        assert not errors, errors[:5]
