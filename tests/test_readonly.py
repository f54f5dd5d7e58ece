"""The read-only guarantee: a run never changes, adds or removes anything in its inputs.

Every test snapshots the input folders (names, bytes, sizes, mtimes, modes) before a run and
compares after: a full passing run with every family and every output, failing runs, runs cut
short by ``-x``/``--maxfail`` or a timeout, a run interrupted by KeyboardInterrupt, and a run that
merges itself. The run folder may gain only the outputs the user named.
"""

from __future__ import annotations

import builtins
import io
import os
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from support.guard import NetworkGuard, differences, install_family, snapshot

from harness.run.result import CheckResult

GATE_CONFIG = Path(__file__).resolve().parent.parent / "fixtures" / "gate" / "merge-harness.toml"
#: os.open flags that write.
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@pytest.fixture
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_llama) -> dict[str, Path]:
    """Private copies of a correct merge, outside the run folder."""
    root = tmp_path_factory.mktemp("readonly-inputs")
    return {name: Path(shutil.copytree(getattr(tiny_llama, name), root / name))
            for name in ("base", "adapter", "merged")}


@pytest.fixture(autouse=True)
def home_elsewhere(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Library caches (matplotlib's font list) go to the user's home, as for any use of them;
    pytester makes the run folder the home, so move it aside to see what the harness writes."""
    home = pytester.path.parent / f"{pytester.path.name}-home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("MPLCONFIGDIR", str(home / ".config" / "matplotlib"))


def args_for(inputs: dict[str, Path], *names: str) -> list[str]:
    flags = {"merged": "--merged-model", "base": "--base-model", "adapter": "--adapter"}
    out: list[str] = []
    for name in names or tuple(flags):
        out += [flags[name], str(inputs[name])]
    return out


def snapshots(inputs: dict[str, Path]) -> dict[str, dict]:
    return {name: snapshot(folder) for name, folder in inputs.items()}


def assert_unchanged(before: dict[str, dict], inputs: dict[str, Path]) -> None:
    for name, folder in inputs.items():
        assert differences(before[name], snapshot(folder)) == [], name


def assert_clean(result: pytest.RunResult) -> None:
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text, text


class OpenRecorder:
    """Records every open of a path inside the input folders, with its mode or flags."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [str(r.resolve()) for r in roots]
        self.writes: list[str] = []
        self.reads = 0

    def note(self, target: object, writes: bool) -> None:
        if isinstance(target, int):
            return
        try:
            where = os.path.realpath(os.fspath(target))  # type: ignore[arg-type]
        except TypeError:
            return
        if any(where == r or where.startswith(r + os.sep) for r in self.roots):
            if writes:
                self.writes.append(where)
            else:
                self.reads += 1

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open, real_os_open = io.open, os.open

        def recording_open(file, mode="r", *args, **kwargs):
            self.note(file, any(c in mode for c in "wax+"))
            return real_open(file, mode, *args, **kwargs)

        def recording_os_open(path, flags, *args, **kwargs):
            self.note(path, bool(flags & WRITE_FLAGS))
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", recording_open)
        monkeypatch.setattr(io, "open", recording_open)
        monkeypatch.setattr(os, "open", recording_os_open)


def test_full_run_changes_nothing_and_fetches_nothing(pytester: pytest.Pytester, inputs):
    """Every family (the committed gate config adds perplexity and an lm-eval benchmark on a
    local task), every output: inputs untouched and never opened for writing, outputs only where
    the user named them, and not one network connection or DNS lookup attempted."""
    before = snapshots(inputs)
    out = pytester.path / "out"
    recorder = OpenRecorder(list(inputs.values()))
    network = NetworkGuard()
    with pytest.MonkeyPatch.context() as patch:
        recorder.install(patch)
        network.install(patch)
        result = pytester.runpytest(
            *args_for(inputs),
            "--merge-config", str(GATE_CONFIG),
            "--merge-examples", "3",
            "--merge-report", str(out / "report.json"),
            "--merge-summary", str(out / "summary.md"),
            "--merge-lock", str(out / "merge-harness.lock"),
            "--update-merge-lock",
        )
    assert_clean(result)
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["PASS merge::benchmark::tiny_choice.acc *"])
    assert network.attempts == []
    assert_unchanged(before, inputs)
    assert recorder.writes == []
    assert recorder.reads > 0  # the recorder saw the harness read its inputs
    # The run folder gained only the output folder, which holds only named outputs.
    assert sorted(p.name for p in pytester.path.iterdir()) == ["out"]
    named = {"report.json", "summary.md", "merge-harness.lock", "report-layers.png"}
    assert {p.name for p in out.iterdir()} <= named
    assert (out / "report.json").is_file()


def _nan(inputs: dict[str, Path]) -> None:
    path = inputs["merged"] / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("inf")
    save_file(tensors, path, metadata={"format": "pt"})


FAST = ("--merge-checks", "structure,security,weights,hash")


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ((), 1),
        (("-x",), 1),
        (("--maxfail", "2"), 1),
        (("--merge-timeout", "0.001"), 1),
    ],
    ids=["failing", "exitfirst", "maxfail", "timeouts"],
)
def test_failing_runs_change_nothing(pytester: pytest.Pytester, inputs, extra, status):
    _nan(inputs)
    before = snapshots(inputs)
    result = pytester.runpytest(*FAST, *args_for(inputs), *extra)
    assert_clean(result)
    assert result.ret == status
    assert_unchanged(before, inputs)
    assert list(pytester.path.iterdir()) == []


def test_interrupted_run_changes_nothing(pytester: pytest.Pytester, inputs, monkeypatch):
    """A KeyboardInterrupt in the middle of a run stops it (exit 2) and leaves no trace."""
    seen: list[str] = []

    def interrupt(ctx):
        seen.append("interrupted")
        raise KeyboardInterrupt

    def after(ctx):
        seen.append("ran after the interrupt")
        return CheckResult.passed("should never run")

    install_family(monkeypatch, {"interrupt": interrupt, "after": after})
    before = snapshots(inputs)
    result = pytester.runpytest(
        "--merge-checks", "structure,weights,security", *args_for(inputs),
        "--merge-report", str(pytester.path / "report.json"),
        no_reraise_ctrlc=True,  # the inner run was interrupted; this test was not
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert seen == ["interrupted"]
    assert_unchanged(before, inputs)
    assert {p.name for p in pytester.path.iterdir()} <= {"report.json", "report-layers.png"}


def test_self_merge_changes_nothing_and_cleans_up(pytester: pytest.Pytester, inputs):
    """Without --merged-model the harness merges into its own temp folder, then removes it."""
    before = snapshots(inputs)
    result = pytester.runpytest(*FAST, *args_for(inputs, "base", "adapter"))
    assert_clean(result)
    assert result.ret == 0, result.stdout.str()
    match = re.search(r"merged with the streaming merger into (\S+)", result.stdout.str())
    assert match, result.stdout.str()
    workdir = Path(match.group(1)).parent
    assert workdir.name.startswith("merge-harness-")
    assert not workdir.exists()
    assert_unchanged(before, inputs)
    assert list(pytester.path.iterdir()) == []


def test_guard_sees_every_kind_of_change(tmp_path: Path):
    """The snapshots are not vacuous: a rewrite with equal bytes, an addition, a removal."""
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a").write_bytes(b"1")
    (folder / "b").write_bytes(b"2")
    before = snapshot(folder)
    assert differences(before, snapshot(folder)) == []
    os.utime(folder / "a", ns=(0, 12345))  # same bytes, new mtime: a write happened
    (folder / "b").unlink()
    (folder / "c").write_bytes(b"3")
    found = " ".join(differences(before, snapshot(folder)))
    assert "changed a" in found and "removed b" in found and "added c" in found
