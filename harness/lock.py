"""The lock file: the approved digests of a merge and the benchmark results that were approved.

A lock file is meant to be committed and reviewed. It is JSON (default, ``merge-harness.lock``)
or TOML (when its name ends in ``.toml``), with sorted keys and one value per line so that a
change shows up as a small diff. It records:

- ``digests``: the canonical content digests of the merged and base checkpoints (see
  ``harness.hashing``) and of the adapter (its tensors plus its ``adapter_config.json`` without
  machine-specific keys such as ``base_model_name_or_path``);
- ``merged_tensors``: the merged checkpoint's per-tensor digests, so a changed merge can be
  traced to the tensors that changed;
- ``harness`` and ``libraries``: the versions that produced it;
- ``benchmarks``: per benchmark check, the evidence (sufficient statistics of every evaluated
  model) and a fingerprint of what was evaluated (task files, limit, few-shot, models).

Transitions (the ``merge::lock::digests`` check and the benchmark checks):

- no lock: nothing to compare; with ``--update-merge-lock`` the run records one;
- all digests equal the locked ones: recorded benchmark evidence is reused and re-judged
  against the current thresholds; the evaluation is skipped;
- a digest changed: the benchmarks run again; without ``--update-merge-lock`` the lock check
  fails naming the digest that changed (and, for the merged one, the tensors); with it the lock
  is rewritten at the end of a run whose gate passed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import DEFAULT_LOCK, read_toml
from harness.context import Context, Options
from harness.errors import ConfigError, HarnessError
from harness.result import Check, CheckResult, Kind, Outcome

if TYPE_CHECKING:
    from harness.adapter import Adapter

FORMAT = "merge-harness.lock/1"
CHECK_ID = "merge::lock::digests"
#: adapter_config.json keys that say where or with what the adapter was saved, not what it is.
VOLATILE_ADAPTER_KEYS = frozenset({"base_model_name_or_path", "revision", "peft_version"})
ADAPTER_DOMAIN = b"merge-harness/adapter/v1\0"
MODELS = ("merged", "base", "adapter")
#: Changed tensor names kept in a result (the message shows a few, the metrics up to this many).
MAX_LISTED = 50


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


def read_lock(path: Path) -> Lock | None:
    """The lock at ``path``, or None when there is none; ConfigError when it is malformed."""
    if not path.exists():
        return None
    if not path.is_file():
        raise ConfigError(f"{path}: lock file is not a regular file")
    if is_toml(path):
        return Lock.from_json(read_toml(path), path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError too
        raise ConfigError(f"{path}: bad JSON lock file: {exc}") from None
    return Lock.from_json(data, path)


def dumps(lock: Lock, *, toml: bool = False) -> str:
    """Serialise a lock: sorted keys, one value per line, trailing newline."""
    data = lock.to_json()
    if toml:
        return dumps_toml(data)
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=True) + "\n"


def write_lock(path: Path, lock: Lock) -> None:
    """Write ``lock`` to ``path`` atomically (a temporary file renamed over it)."""
    text = dumps(lock, toml=is_toml(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


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
        return json.dumps(value, ensure_ascii=False)
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


# ----------------------------------------------------------------------------- digests


def adapter_digest(adapter: Adapter) -> str:
    """A canonical digest of an adapter: its tensors and its config (machine keys removed).

    Independent of file layout and of where the base model lived when the adapter was saved;
    any changed weight, rank, alpha, target module or pattern changes it.
    """
    from harness.hashing import combine, tensor_digest

    tensors: dict[str, str] = {}
    for key, info in adapter.tensors.items():
        if adapter.file is not None:
            with info.file.open("rb", buffering=0) as handle:
                handle.seek(info.start)
                data = handle.read(info.nbytes)
            if len(data) != info.nbytes:
                raise HarnessError(f"{info.file}: truncated while reading {key!r}")
        else:
            import torch

            tensor = adapter.tensor(key).contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        tensors[key] = tensor_digest(key, info.dtype, info.shape, data)
    config = {k: v for k, v in adapter.config.items() if k not in VOLATILE_ADAPTER_KEYS}
    outer = hashlib.sha256(ADAPTER_DOMAIN)
    outer.update(combine(tensors).encode())
    outer.update(json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode())
    return outer.hexdigest()


@dataclass
class Current:
    """The digests of this run's inputs."""

    digests: dict[str, str]
    merged_tensors: dict[str, str]


def current_digests(ctx: Context) -> Current:
    """Digests of the merged, base and adapter inputs (cached; shares the structure scans)."""

    def compute() -> Current:
        from harness.structure import base_scan, merged_scan

        merged = merged_scan(ctx).manifest
        digests = {"merged": merged.digest}
        if ctx.has_base:
            digests["base"] = base_scan(ctx).manifest.digest
        if ctx.has_adapter:
            digests["adapter"] = adapter_digest(ctx.adapter())
        return Current(digests, dict(merged.tensors))

    return ctx.memo("lock:current", compute)


# ----------------------------------------------------------------------------- state


@dataclass
class LockState:
    """How this run's inputs compare with the lock file."""

    path: Path
    #: "absent", "match" or "changed".
    status: str
    current: Current
    recorded: Lock | None = None
    #: Which of merged/base/adapter changed.
    changed: list[str] = field(default_factory=list)
    #: Merged tensors whose digest changed (or that appeared or disappeared).
    changed_tensors: list[str] = field(default_factory=list)


def lock_path(options: Options) -> Path:
    """Where the lock file is (set by ``load_settings``; rootdir default otherwise)."""
    return options.lock_path if options.lock_path is not None else Path.cwd() / DEFAULT_LOCK


def lock_state(ctx: Context) -> LockState:
    """Compare this run's digests with the lock file (cached)."""

    def compute() -> LockState:
        path = lock_path(ctx.options)
        recorded = read_lock(path)
        current = current_digests(ctx)
        if recorded is None:
            return LockState(path, "absent", current)
        changed = [m for m in MODELS if recorded.digests.get(m) != current.digests.get(m)]
        tensors: list[str] = []
        if "merged" in changed:
            old, new = recorded.merged_tensors, current.merged_tensors
            tensors = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
        status = "changed" if changed else "match"
        return LockState(path, status, current, recorded, changed, tensors)

    return ctx.memo("lock:state", compute)


def reusable(ctx: Context, check_id: str, fingerprint: str) -> dict[str, Any] | None:
    """The recorded benchmark entry for ``check_id`` when the lock allows reusing it.

    Reuse needs every digest to match the lock and the same evaluation fingerprint; a lock that
    cannot be read allows nothing (its own check reports why).
    """
    if not lock_path(ctx.options).is_file():
        return None  # nothing recorded: skip computing the digests here
    try:
        state = lock_state(ctx)
    except HarnessError:
        return None
    if state.status != "match" or state.recorded is None:
        return None
    entry = state.recorded.benchmarks.get(check_id)
    if entry is None or entry.get("fingerprint") != fingerprint:
        return None
    return entry


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest[:12]


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_lock(ctx: Context) -> CheckResult:
    """Compare the inputs' digests with the lock file; fail on a change not being approved."""
    state = lock_state(ctx)
    update = ctx.options.update_lock
    current = state.current.digests
    metrics: dict[str, Any] = {
        "lock_path": str(state.path),
        "lock_status": state.status,
        "update": update,
        "digests": dict(current),
        "changed": list(state.changed),
        "changed_tensors": state.changed_tensors[:MAX_LISTED],
        "changed_tensor_count": len(state.changed_tensors),
    }
    if update:
        # Private (underscore, left out of reports): carried to the controller, which writes the
        # lock file, only when it is going to write one.
        metrics["_merged_tensors"] = dict(state.current.merged_tensors)
    for model, digest in current.items():
        metrics[f"{model}_digest"] = digest
    name = state.path.name
    if state.status == "absent":
        if update:
            return CheckResult.passed(
                f"no lock file {name} yet: this run records one if the gate passes"
                " (--update-merge-lock)",
                **metrics,
            )
        return CheckResult(
            Outcome.WARNING,
            f"no lock file {name}: nothing approved to compare with; run with"
            " --update-merge-lock to record this merge",
            metrics=metrics,
        )
    if state.status == "match":
        reused = (
            "recorded benchmark results are reused"
            if state.recorded and (state.recorded.benchmarks)
            else "no benchmark results recorded"
        )
        return CheckResult.passed(
            f"digests match {name} (merged {_short(current.get('merged'))}): {reused}",
            **metrics,
        )
    recorded = state.recorded.digests if state.recorded else {}
    parts = []
    details = []
    for model in state.changed:
        parts.append(f"{model} {_short(recorded.get(model))} -> {_short(current.get(model))}")
        details.append(f"{model}: locked {recorded.get(model)}, now {current.get(model)}")
    summary = f"{' and '.join(state.changed)} digest{'s' if len(state.changed) > 1 else ''}"
    text = f"{summary} changed since {name} ({'; '.join(parts)})"
    if state.changed_tensors:
        count = len(state.changed_tensors)
        text += f"; {count} merged tensor(s) differ: {_names(state.changed_tensors)}"
        details.extend(f"changed tensor: {n}" for n in state.changed_tensors[:10])
    if update:
        return CheckResult(
            Outcome.PASSED,
            text + "; benchmarks re-run, lock rewritten if the gate passes",
            details,
            metrics,
        )
    return CheckResult.failed(
        text + "; benchmarks re-run; approve with --update-merge-lock", details, **metrics
    )


def active(options: Options) -> bool:
    """Whether the lock check applies: asked for, or a lock file exists, or updating."""
    gate = options.gate
    requested = bool(gate is not None and gate.lock_requested)
    return options.update_lock or requested or lock_path(options).exists()


def checks(options: Options) -> list[Check]:
    """The lock family: one check comparing digests with the lock file, when a lock applies."""
    if not active(options):
        return []
    return [
        Check(
            "lock",
            "digests",
            Kind.HASH,
            "merged, base and adapter digests match the approved lock file",
            check_lock,
        )
    ]


# ----------------------------------------------------------------------------- writing


def build_lock(
    results: Mapping[str, CheckResult], versions: Mapping[str, str], harness_version: str
) -> Lock | None:
    """The lock for this run's results, or None when the lock check did not run.

    Benchmark entries come from every result that carries ``evidence`` and ``fingerprint``
    metrics (fresh or reused).
    """
    lock_result = results.get(CHECK_ID)
    if lock_result is None or "digests" not in lock_result.metrics:
        return None
    digests = {str(k): str(v) for k, v in dict(lock_result.metrics["digests"]).items()}
    tensors = {
        str(k): str(v) for k, v in dict(lock_result.metrics.get("_merged_tensors", {})).items()
    }
    benchmarks: dict[str, dict[str, Any]] = {}
    for check_id, result in sorted(results.items()):
        metrics = result.metrics
        if "evidence" in metrics and "fingerprint" in metrics:
            benchmarks[check_id] = {
                "fingerprint": metrics["fingerprint"],
                "evidence": metrics["evidence"],
                "outcome": result.outcome.value,
                "value": metrics.get("value"),
            }
    return Lock(digests, tensors, harness_version, dict(versions), benchmarks)
