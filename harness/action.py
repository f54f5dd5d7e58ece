"""``merge-harness gate``: the command behind the GitHub Action, usable anywhere.

It runs the merge checks with pytest in a subprocess (a clean interpreter, exactly what a user's
``pytest --merged-model ...`` would do), asks pytest for JUnit XML, the JSON report and the
markdown summary in one report folder, and then, only when ``GITHUB_ACTIONS=true``:

- prints an ``::error`` annotation per failed check (``::warning`` for inconclusive ones),
- appends the markdown summary to ``$GITHUB_STEP_SUMMARY``,
- writes ``outcome=passed|failed``, the exit code and the report paths to ``$GITHUB_OUTPUT``.

It returns pytest's exit code, so a failing gate fails the step. Every option also reads a
``MERGE_HARNESS_*`` environment variable, which is how the composite action passes its inputs
without interpolating them into shell (GitHub's template-injection hazard).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from harness.errors import HarnessError
from harness.gate import github
from harness.gate.markdown import render_markdown
from harness.io.files import MAX_JSON_BYTES, read_bounded
from harness.run.config import DEFAULT_LOCK

#: Report files written into the report folder, by output name.
REPORT_FILES = {
    "junit": "junit.xml",
    "report": "merge-report.json",
    "summary": "merge-summary.md",
}

DEFAULT_REPORT_DIR = "merge-harness-reports"

#: Step outputs the gate writes (action.yml declares the same; a test keeps them in sync).
OUTPUTS = (
    "outcome", "exit-code", "report-dir", *REPORT_FILES, "lock-file", "lock-changed",
)

#: option dest -> environment variable read as its default (the composite action sets these).
ENV_VARS = {
    "merged_model": "MERGE_HARNESS_MERGED_MODEL",
    "base_model": "MERGE_HARNESS_BASE_MODEL",
    "adapter": "MERGE_HARNESS_ADAPTER",
    "config": "MERGE_HARNESS_CONFIG",
    "lock": "MERGE_HARNESS_LOCK",
    "update_lock": "MERGE_HARNESS_UPDATE_LOCK",
    "report_dir": "MERGE_HARNESS_REPORT_DIR",
    "pytest_args": "MERGE_HARNESS_PYTEST_ARGS",
    "shard": "MERGE_HARNESS_SHARD",
    "combine": "MERGE_HARNESS_COMBINE",
}

#: Title of the annotations about the run as a whole (not about one check).
GATE_TITLE = "merge-harness gate"

#: Variables the pytest child must not see: the gate command alone talks to GitHub, so
#: annotations and the summary appear once even if the plugin also knows how to emit them.
_GITHUB_ONLY = ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "GITHUB_OUTPUT")

#: The host project's pytest settings from the environment, which the gate does not inherit.
_HOST_PYTEST = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


class GateUsageError(Exception):
    """Bad arguments to ``merge-harness gate`` (exit status 4, like a pytest usage error)."""


@dataclass
class GateRequest:
    """What one gate run checks and where it writes its reports."""

    merged_model: str | None = None
    base_model: str | None = None
    adapter: str | None = None
    config: str | None = None
    lock: str | None = None
    update_lock: bool = False
    report_dir: Path = Path(DEFAULT_REPORT_DIR)
    #: Extra pytest arguments, appended last (``-- -x -k structure``).
    pytest_args: list[str] = field(default_factory=list)
    #: ``K/N``: run part K of N of the streamed checks (``--merge-shard``).
    shard: str | None = None
    #: Folders (or files) of part reports to judge together instead of running pytest.
    combine: list[str] = field(default_factory=list)

    def report_paths(self) -> dict[str, Path]:
        """The absolute path of each report file, by output name."""
        root = self.report_dir.absolute()
        return {name: root / filename for name, filename in REPORT_FILES.items()}


@dataclass
class GateRun:
    """What a gate run produced: pytest's exit code and the report it wrote, if any."""

    exit_code: int
    report: dict[str, Any] | None
    #: The markdown for the step summary (the plugin's, or a note when pytest wrote none).
    summary: str
    paths: dict[str, Path]
    #: The lock file this run compared with (None: no lock in play).
    lock_file: Path | None = None
    #: Whether the run rewrote the lock file's bytes (None: unknown or no lock).
    lock_changed: bool | None = None

    @property
    def outcome(self) -> str:
        """``passed`` only for exit status 0 (``part`` for a recorded part); else ``failed``."""
        if self.exit_code != 0:
            return "failed"
        verdict = (self.report or {}).get("verdict") or {}
        return "part" if verdict.get("outcome") == "part" else "passed"


def parse_bool(value: str, name: str) -> bool:
    """A boolean from an action input or environment variable (``true``/``false``, ``1``/``0``)."""
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise GateUsageError(f"{name}: expected true or false, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``merge-harness gate`` on ``parser``."""
    paths = parser.add_argument_group("inputs (each defaults to its MERGE_HARNESS_* variable)")
    paths.add_argument("--merged-model", metavar="PATH", help="the merged checkpoint folder")
    paths.add_argument("--base-model", metavar="PATH", help="the base checkpoint folder")
    paths.add_argument("--adapter", metavar="PATH", help="the PEFT adapter folder")
    paths.add_argument("--config", metavar="FILE", help="gate configuration (--merge-config)")
    paths.add_argument("--lock", metavar="FILE", help="lock file (--merge-lock)")
    paths.add_argument(
        "--update-lock", action="store_const", const=True, default=None,
        help="record this run's digests and results in the lock file (--update-merge-lock)",
    )
    parser.add_argument(
        "--report-dir", metavar="DIR", type=Path, default=None,
        help=f"folder for junit.xml, merge-report.json, merge-summary.md"
        f" (default: {DEFAULT_REPORT_DIR}; a dedicated folder, it is what pytest collects)",
    )
    split = parser.add_argument_group("sharded runs (one part per CI job, then one combine)")
    split.add_argument("--shard", metavar="K/N",
                       help="run part K of N of the streamed checks (--merge-shard)")
    split.add_argument(
        "--combine", metavar="PATH", action="append", default=None,
        help="judge the part reports in PATH (a folder searched for *.json, or a file; may"
        " repeat) with merge-harness combine instead of running pytest",
    )
    parser.add_argument(
        "pytest_args", nargs="*", metavar="-- PYTEST_ARGS",
        help="extra pytest arguments after --, e.g. -- -x -n 2",
    )


def request_from_args(
    namespace: argparse.Namespace, env: Mapping[str, str] | None = None
) -> GateRequest:
    """Combine parsed options with the ``MERGE_HARNESS_*`` variables (options win)."""
    environ = os.environ if env is None else env

    def pick(dest: str) -> str | None:
        given = getattr(namespace, dest, None)
        if given:
            return str(given)
        value = environ.get(ENV_VARS[dest], "").strip()
        return value or None

    update = namespace.update_lock
    if update is None:
        update = parse_bool(environ.get(ENV_VARS["update_lock"], ""), ENV_VARS["update_lock"])
    report_dir = namespace.report_dir or Path(pick("report_dir") or DEFAULT_REPORT_DIR)
    extra = [a for a in namespace.pytest_args if a != "--"] if namespace.pytest_args else []
    env_extra = environ.get(ENV_VARS["pytest_args"], "")
    try:
        extra = shlex.split(env_extra) + extra
    except ValueError as exc:
        raise GateUsageError(f"{ENV_VARS['pytest_args']}: {exc}") from None
    combine = list(getattr(namespace, "combine", None) or [])
    if not combine:
        combine = environ.get(ENV_VARS["combine"], "").split()
    request = GateRequest(
        shard=pick("shard"),
        combine=combine,
        merged_model=pick("merged_model"),
        base_model=pick("base_model"),
        adapter=pick("adapter"),
        config=pick("config"),
        lock=pick("lock"),
        update_lock=bool(update),
        report_dir=report_dir,
        pytest_args=extra,
    )
    validate(request)
    return request


def validate(request: GateRequest, cwd: Path | None = None) -> None:
    """Refuse requests pytest would only half-understand, with a one-line cause."""
    if request.combine and request.shard:
        raise GateUsageError("--combine judges the parts; it takes no --shard")
    if request.combine:
        return
    if not (request.merged_model or request.adapter):
        raise GateUsageError(
            "nothing to check: give --merged-model (with --base-model and --adapter), or"
            " --adapter (and --base-model) to let the harness merge and check its own merge"
        )
    here = (cwd or Path.cwd()).resolve()
    folder = request.report_dir.resolve()
    if folder == here or folder in here.parents:
        raise GateUsageError(
            f"--report-dir {request.report_dir}: use a dedicated folder, not the working"
            " directory or one of its parents (pytest collects the report folder)"
        )


def pytest_command(request: GateRequest, python: str | None = None) -> list[str]:
    """The pytest command line of a gate run.

    The run is isolated from the host repository's pytest setup: no ini file (``-c`` an empty
    device, so its ``addopts``, plugins and markers do not apply), no ``conftest.py``, and
    pytest collects only the (test-free) report folder, so the repository's own tests are not
    run. ``--rootdir`` is the working directory, where the gate configuration
    (``[tool.merge-harness]`` in pyproject.toml, or merge-harness.toml) is read. The cache
    plugin is off: nothing is written outside the report folder except the lock file, and that
    only on request.
    """
    paths = request.report_paths()
    command = [
        python or sys.executable, "-m", "pytest", str(request.report_dir.absolute()),
        f"--config-file={os.devnull}", f"--rootdir={Path.cwd()}", "--noconftest",
        "-p", "no:cacheprovider",
    ]
    for flag, value in (
        ("--merged-model", request.merged_model),
        ("--base-model", request.base_model),
        ("--adapter", request.adapter),
        ("--merge-config", request.config),
        ("--merge-lock", request.lock),
    ):
        if value:
            command += [flag, value]
    if request.update_lock:
        command.append("--update-merge-lock")
    if request.shard:
        command.append(f"--merge-shard={request.shard}")
    command += [
        f"--junitxml={paths['junit']}",
        f"--merge-report={paths['report']}",
        f"--merge-summary={paths['summary']}",
    ]
    return command + list(request.pytest_args)


def combine_command(request: GateRequest, python: str | None = None) -> list[str]:
    """The ``merge-harness combine`` command of a combining gate run.

    Every ``*.json`` under each folder named by ``--combine`` is a part report (the artifacts
    of the matrix jobs, downloaded side by side); a file is taken as it is.
    """
    found: list[str] = []
    outputs = request.report_dir.absolute()
    for given in request.combine:
        path = Path(given)
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*.json")
                            if outputs not in p.absolute().parents)
        else:
            found.append(str(path))
    if not found:
        raise GateUsageError(f"--combine {' '.join(request.combine)}: no part reports there")
    paths = request.report_paths()
    command = [python or sys.executable, "-m", "harness.cli", "combine", *found,
               f"--junitxml={paths['junit']}", f"--merge-report={paths['report']}",
               f"--merge-summary={paths['summary']}"]
    if request.config:
        command.append(f"--merge-config={request.config}")
    if request.lock:
        command.append(f"--merge-lock={request.lock}")
    if request.update_lock:
        command.append("--update-merge-lock")
    return command


def _child_env(env: Mapping[str, str]) -> dict[str, str]:
    # The host's PYTEST_ADDOPTS / PYTEST_PLUGINS belong to its own test suite, not to the gate.
    child = {k: v for k, v in env.items() if k not in (*_GITHUB_ONLY, *_HOST_PYTEST)}
    # The harness never downloads; say so to transformers/huggingface_hub in the child too.
    child.setdefault("HF_HUB_OFFLINE", "1")
    return child


def lock_candidates(request: GateRequest) -> list[Path]:
    """Where the run's lock file may be: the one given, or the defaults beside the config."""
    if request.lock:
        return [Path(request.lock).absolute()]
    folders = [Path.cwd()]
    if request.config:
        folders.insert(0, Path(request.config).absolute().parent)
    return [folder / DEFAULT_LOCK for folder in folders]


def _lock_file(request: GateRequest, report: Mapping[str, Any] | None) -> Path | None:
    """The lock file of the run: as given, else as the report names it (when one applied)."""
    if request.lock:
        return Path(request.lock).absolute()
    path = ((report or {}).get("lock") or {}).get("path")
    return Path(path).absolute() if path else None


def _file_digest(path: Path) -> str | None:
    try:
        # bounded and regular only: a lock planted as a symlink to /dev/zero is never read
        data = read_bounded(path, MAX_JSON_BYTES, what="lock file", confined=False)
    except HarnessError:
        return None
    return hashlib.sha256(data).hexdigest()


def read_report(path: Path) -> dict[str, Any] | None:
    """The JSON report of a run, or None when pytest stopped before writing one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def render_summary(
    report: Mapping[str, Any] | None, exit_code: int, paths: Mapping[str, Path]
) -> str:
    """The markdown when pytest wrote no summary file: rendered from the JSON report, or a note."""
    if report is not None:
        return render_markdown(report)
    return fallback_summary(exit_code, paths)


def fallback_summary(exit_code: int, paths: Mapping[str, Path]) -> str:
    """The step summary when pytest wrote none (usage error, crash before the report)."""
    return (
        "## merge-harness: no report\n\n"
        f"pytest exited with status {exit_code} without writing `{paths['summary'].name}`;"
        " the job log shows why.\n"
    )


def run_gate(
    request: GateRequest,
    env: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> GateRun:
    """Run pytest on ``request`` and publish the results to GitHub when running in Actions."""
    environ = dict(os.environ if env is None else env)
    out = sys.stdout if stream is None else stream
    in_actions = github.in_actions(environ)
    paths = request.report_paths()
    request.report_dir.mkdir(parents=True, exist_ok=True)
    for path in paths.values():
        # A stale report of an earlier run must never be published as this run's.
        path.unlink(missing_ok=True)
    locks_before = {path: _file_digest(path) for path in lock_candidates(request)}

    command = combine_command(request) if request.combine else pytest_command(request)
    out.write(f"merge-harness gate: {shlex.join(command)}\n")
    out.flush()
    token = secrets.token_hex(16)
    if in_actions:
        # The log of the child (tensor names, config values of the checkpoint) is untrusted
        # text: stop GitHub from reading workflow commands in it while it runs.
        github.emit([f"::stop-commands::{token}"], out)
    try:
        exit_code = subprocess.run(command, env=_child_env(environ), check=False).returncode
    finally:
        if in_actions:
            github.emit([f"::{token}::"], out)

    report = read_report(paths["report"])
    try:
        summary = paths["summary"].read_text(encoding="utf-8")
    except OSError:
        summary = render_summary(report, exit_code, paths)
    lock_file = _lock_file(request, report)
    lock_changed = None
    if lock_file is not None and lock_file in locks_before:
        lock_changed = _file_digest(lock_file) != locks_before[lock_file]
    run = GateRun(exit_code, report, summary, paths, lock_file, lock_changed)
    if in_actions:
        publish(run, request, environ, out)
    tool = "combine" if request.combine else "pytest"
    verdict = {"passed": "passed", "part": f"part {request.shard} recorded"}.get(
        run.outcome, f"failed ({tool} exit status {exit_code})"
    )
    out.write(f"merge-harness gate: {verdict}; reports in {request.report_dir}\n")
    out.flush()
    return run


def annotation_lines(run: GateRun, env: Mapping[str, str] | None = None) -> list[str]:
    """The annotation lines of a run, from its JSON report.

    One per check that did not pass (a lock check is anchored to the lock file); when the gate
    failed without a failed check (the lock file could not be written, say) one error with the
    verdict's reasons; when pytest wrote no report at all (usage error, crash) one error that
    says so.
    """
    if run.report is None:
        level = "error" if run.exit_code != 0 else "warning"
        return [github.annotation(
            level,
            f"pytest exited with status {run.exit_code} without writing a JSON report;"
            " see the log",
            title=GATE_TITLE,
        )]
    lock = run.report.get("lock") or {}
    lock_file = _workspace_path(str(run.lock_file) if run.lock_file else None, env)
    files = {
        str(check.get("id")): lock_file
        for check in run.report.get("checks", [])
        if lock_file and check.get("lock")
    }
    lines = github.report_annotations(run.report, files=files)
    if run.exit_code != 0 and not any(line.startswith("::error") for line in lines):
        lines.append(github.annotation(
            "error", _gate_message(run.report, run.exit_code), title=GATE_TITLE,
            file=lock_file if lock.get("error") else None,
        ))
    return lines


def _gate_message(report: Mapping[str, Any], exit_code: int) -> str:
    """Why the gate failed when no check did: the verdict's reasons, or the lock error."""
    verdict = report.get("verdict") or {}
    reasons = [str(r) for r in verdict.get("reasons", []) or []]
    lock = report.get("lock") or {}
    if lock.get("error"):
        reasons.append(f"lock file {lock.get('path')}: cannot write: {lock['error']}")
    elif lock.get("reason"):
        reasons.append(f"lock file {lock.get('path')} NOT updated: {lock['reason']}")
    return "\n".join(reasons) or f"pytest exited with status {exit_code}; see the log"


def _workspace_path(path: str | None, env: Mapping[str, str] | None) -> str | None:
    """``path`` relative to the repository (how annotations name files), or None outside it."""
    if not path:
        return None
    environ = os.environ if env is None else env
    root = Path(environ.get("GITHUB_WORKSPACE") or Path.cwd()).absolute()
    try:
        return Path(path).absolute().relative_to(root).as_posix()
    except ValueError:
        return None


def publish(
    run: GateRun, request: GateRequest, env: Mapping[str, str], stream: TextIO
) -> None:
    """Annotations on stdout, the summary into the step summary, outputs into the step outputs."""
    github.emit(annotation_lines(run, env), stream)
    github.append_summary(run.summary, env)
    outputs: dict[str, object] = {
        "outcome": run.outcome,
        "exit-code": run.exit_code,
        "report-dir": request.report_dir.absolute(),
    }
    for name, path in run.paths.items():
        outputs[name] = path if path.exists() else ""
    if run.lock_file is not None:
        outputs["lock-file"] = run.lock_file
        outputs["lock-changed"] = "true" if run.lock_changed else "false"
    github.write_outputs(outputs, env)


def run(namespace: argparse.Namespace) -> int:
    """Entry of the ``gate`` subcommand: pytest's exit code (4 for a bad request)."""
    try:
        request = request_from_args(namespace)
        if request.combine:
            combine_command(request)  # no part reports: a usage error before anything runs
    except GateUsageError as exc:
        sys.stderr.write(f"merge-harness gate: error: {exc}\n")
        if github.in_actions():
            github.emit([github.annotation("error", str(exc), title=GATE_TITLE)])
            github.append_summary(f"## merge-harness: gate not run\n\n{exc}\n")
            github.write_outputs({"outcome": "failed", "exit-code": 4})
        return 4
    return run_gate(request).exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.action``: the gate command on its own."""
    parser = argparse.ArgumentParser(
        prog="merge-harness gate",
        description="Run the merge checks and report to GitHub Actions when run there.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
