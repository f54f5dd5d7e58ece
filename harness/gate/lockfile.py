"""The lock file: the approved digests of a merge and the benchmark results that were approved.

A lock file is meant to be committed and reviewed. It is JSON (default, ``merge-harness.lock``)
or TOML (when its name ends in ``.toml``), with sorted keys and one value per line so that a
change shows up as a small diff. It records:

- ``digests``: the canonical content digests of the merged and base checkpoints (see
  ``harness.stream.hashing``) and of the adapter (its tensors plus its ``adapter_config.json``
  without machine-specific keys such as ``base_model_name_or_path``);
- ``merged_tensors``: the merged checkpoint's per-tensor digests, so a changed merge can be
  traced to the tensors that changed;
- ``harness`` and ``libraries``: the versions that produced it;
- ``benchmarks``: per benchmark check, the evidence (sufficient statistics of every evaluated
  model) and a fingerprint of what was evaluated (task files, limit, few-shot, models).

Transitions (the ``merge::lock::digests`` check, :mod:`harness.checks.lock`, and the benchmark
checks):

- no lock: nothing to compare; with ``--update-merge-lock`` the run records one;
- all digests equal the locked ones: recorded benchmark evidence is reused and re-judged
  against the current thresholds; the evaluation is skipped;
- a digest changed: the benchmarks run again; without ``--update-merge-lock`` the lock check
  fails naming the digest that changed (and, for the merged one, the tensors); with it the lock
  is rewritten at the end of a run whose gate passed.
"""


from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import CheckpointError, ConfigError, one_line
from harness.io.files import MAX_JSON_BYTES, check_regular_file, exists
from harness.io.output import write_text_atomic
from harness.run.config import read_toml
from harness.run.result import CheckResult

FORMAT = "merge-harness.lock/1"
CHECK_ID = "merge::lock::digests"
MODELS = ("merged", "base", "adapter")


class LockStatus(str, enum.Enum):
    """How a run's digests compare with the lock file."""

    ABSENT = "absent"
    MATCH = "match"
    CHANGED = "changed"


@dataclass
class Lock:
    """The content of a lock file."""

    digests: dict[str, str]
    merged_tensors: dict[str, str] = field(default_factory=dict)
    harness: str = ""
    libraries: dict[str, str] = field(default_factory=dict)
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The file's content as a plain, sorted mapping."""
        return {
            "format": FORMAT,
            "harness": self.harness,
            "libraries": dict(sorted(self.libraries.items())),
            "digests": dict(sorted(self.digests.items())),
            "merged_tensors": dict(sorted(self.merged_tensors.items())),
            "benchmarks": {k: self.benchmarks[k] for k in sorted(self.benchmarks)},
        }

    @classmethod
    def from_json(cls, data: Any, path: Path) -> Lock:
        """Validate a parsed lock file; raise ConfigError naming the file."""
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a lock file (expected a table/object)")
        if data.get("format") != FORMAT:
            raise ConfigError(
                f"{path}: unsupported lock format {data.get('format')!r} (expected {FORMAT!r})"
            )
        digests = data.get("digests")
        if not isinstance(digests, dict) or not isinstance(digests.get("merged"), str):
            raise ConfigError(f"{path}: digests.merged missing")
        unknown = sorted(set(digests) - set(MODELS))
        if unknown:
            raise ConfigError(f"{path}: unknown digest(s) {', '.join(unknown)}")
        extra = sorted(set(data) - set(cls(digests={}).to_json()))
        if extra:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(map(str, extra))}")
        tensors = data.get("merged_tensors", {})
        benchmarks = data.get("benchmarks", {})
        libraries = data.get("libraries", {})
        for key, value in (
            ("merged_tensors", tensors),
            ("benchmarks", benchmarks),
            ("libraries", libraries),
        ):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {key} must be a table/object")
        return cls(
            {k: str(v) for k, v in digests.items()},
            {str(k): str(v) for k, v in tensors.items()},
            str(data.get("harness", "")),
            {str(k): str(v) for k, v in libraries.items()},
            {str(k): dict(v) for k, v in benchmarks.items() if isinstance(v, dict)},
        )


# ----------------------------------------------------------------------------- file format


def is_toml(path: Path) -> bool:
    """Whether a lock file is TOML (by its name) rather than JSON."""
    return path.suffix.lower() == ".toml"


def read_lock(path: Path, *, named: bool = False) -> Lock | None:
    """The lock at ``path``, or None when there is none; ConfigError when it is malformed.

    A lock path that is a symlink is refused unless the user ``named`` it (``--merge-lock``):
    a symlink planted in a pull request would otherwise have the gate read, and quote, any
    file of the runner. The file is bounded like every JSON input.
    """
    if not exists(path):
        return None
    if path.is_symlink() and not named:
        raise ConfigError(
            f"{path}: lock file is a symlink; refusing to follow it (name it with --merge-lock"
            " to use it)"
        )
    try:
        size = check_regular_file(path, confined=False)
    except CheckpointError as exc:
        raise ConfigError(f"{path}: lock file is not a regular file ({one_line(exc)})") from None
    if size > MAX_JSON_BYTES:
        raise ConfigError(f"{path}: {size} bytes is too large for a lock file")
    if is_toml(path):
        return Lock.from_json(read_toml(path), path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError too
        raise ConfigError(f"{path}: bad JSON lock file: {one_line(exc)}") from None
    return Lock.from_json(data, path)


def dumps(lock: Lock, *, toml: bool = False) -> str:
    """Serialise a lock: sorted keys, one value per line, trailing newline."""
    data = lock.to_json()
    if toml:
        return dumps_toml(data)
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=True) + "\n"


def write_lock(path: Path, lock: Lock, *, named: bool = False) -> Path:
    """Write ``lock`` to ``path`` atomically; return the file written.

    Through :func:`harness.io.output.write_atomic`: an exclusive temporary file with a random
    name beside the lock, synced, renamed over it. A symlink at ``path`` is refused unless the
    user ``named`` the path; then the link's target is replaced. Raises a HarnessError.
    """
    text = dumps(lock, toml=is_toml(path))
    return write_text_atomic(path, text, follow_symlink=named)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _unicode(text: str) -> str:
    """``text`` itself, or ConfigError: TOML cannot hold a lone surrogate (JSON can)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"cannot write {text!r} to a TOML lock file: not valid Unicode (use a JSON lock)"
        ) from None
    return text


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(_unicode(key), ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes (\", \\, \n, \u00XX) are valid TOML basic-string escapes.
        return json.dumps(_unicode(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(
            f"{_toml_key(str(k))} = {_toml_value(v)}"
            for k, v in sorted(value.items())
            if v is not None
        )
        return "{" + inner + "}" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(data: Mapping[str, Any]) -> str:
    """A small TOML writer for nested tables of scalars and lists (what a lock file holds)."""
    lines: list[str] = []

    def emit(table: Mapping[str, Any], path: tuple[str, ...]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping) and v is not None}
        tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
        if path and (scalars or not tables):
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for key in sorted(scalars):
            lines.append(f"{_toml_key(key)} = {_toml_value(scalars[key])}")
        for key in sorted(tables):
            emit(tables[key], (*path, key))

    emit(data, ())
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- building


def build_lock(
    results: Mapping[str, CheckResult], versions: Mapping[str, str], harness_version: str
) -> Lock | None:
    """The lock for this run's results, or None when the lock check did not run.

    Benchmark entries come from every result that carries ``evidence`` and ``fingerprint``
    metrics (fresh or reused).
    """
    lock_result = results.get(CHECK_ID)
    if lock_result is None or lock_result.lock is None or not lock_result.digests:
        return None
    benchmarks: dict[str, dict[str, Any]] = {}
    for check_id, result in sorted(results.items()):
        record = result.record
        if record is not None:
            benchmarks[check_id] = {
                "fingerprint": record.fingerprint,
                "evidence": record.evidence,
                "outcome": result.outcome.value,
                "value": record.value,
            }
    return Lock(
        dict(lock_result.digests),
        dict(lock_result.lock.merged_tensors),
        harness_version,
        dict(versions),
        benchmarks,
    )
