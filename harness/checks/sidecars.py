"""Sidecar files of a checkpoint: tokenizer files and ``generation_config.json``.

A merge changes weights, never the tokenizer or the decoding defaults: each sidecar the base
ships (or the adapter, when it ships its own, e.g. after adding tokens) must be present in the
merged folder with the same content. A difference is a warning, not a failure (a deliberate new
chat template is legitimate), and the warning shows the diff.

Sidecars are read like checkpoint files (:func:`harness.io.files.read_bounded`): regular files
inside their own folder, of bounded size. A sidecar that is a symlink leaving its folder (to
``/proc/self/environ``, say), a pipe or a device fails the check unread. What the report shows
is what the comparison computed: the JSON key paths that differ with short, escaped values, or
the differing lines of a text file, each cut short, never a whole file.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from harness.errors import CheckpointError, one_line
from harness.io.files import MAX_JSON_BYTES, exists, read_bounded
from harness.merger import SIDE_FILES
from harness.run.context import Context
from harness.run.result import CheckResult, Outcome
from harness.text import safe_line

#: Files compared, in report order: the same set the streaming merger copies.
SIDECAR_FILES = SIDE_FILES
#: Only these may come from the adapter (a retrained tokenizer); decoding defaults are the base's.
ADAPTER_MAY_SHIP = frozenset(SIDECAR_FILES) - {"generation_config.json"}
#: Largest sidecar read (tokenizer.json files of large vocabularies are tens of MB).
MAX_SIDECAR_BYTES = MAX_JSON_BYTES
#: Characters of one differing text line shown in a report.
MAX_LINE = 120
#: JSON keys that record who wrote the file, not what it means.
IGNORED_KEYS = frozenset(
    {
        "transformers_version",
        "_from_model_config",
        "name_or_path",
        "_commit_hash",
        # loader bookkeeping that save_pretrained writes back when the tokenizer was loaded
        # from a local folder (load from the base, save with the merge)
        "is_local",
        "local_files_only",
    }
)


def _load_json(raw: bytes, path: Path) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError:  # not JSON after all: compared as text
        return None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply to parse") from None


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in IGNORED_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _json_diff(expected: Any, actual: Any, prefix: str = "") -> list[str]:
    """Key paths whose values differ, as ``path: expected -> actual`` lines."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        lines: list[str] = []
        for key in sorted(set(expected) | set(actual), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in actual:
                lines.append(f"{path}: {_short(expected[key])} -> (missing)")
            elif key not in expected:
                lines.append(f"{path}: (absent) -> {_short(actual[key])}")
            else:
                lines.extend(_json_diff(expected[key], actual[key], path))
        return lines
    if expected != actual:
        return [f"{prefix or '(document)'}: {_short(expected)} -> {_short(actual)}"]
    return []


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compare_file(reference: Path, merged: Path) -> list[str]:
    """Differences between two sidecars (empty when equivalent): JSON by key, text by line.

    Raises :class:`CheckpointError` when either file may not be read (see the module docs).
    """
    old = read_bounded(reference, MAX_SIDECAR_BYTES, what="sidecar file")
    new = read_bounded(merged, MAX_SIDECAR_BYTES, what="sidecar file")
    if old == new:
        return []
    if reference.suffix == ".json":
        expected, actual = _load_json(old, reference), _load_json(new, merged)
        if expected is not None and actual is not None:
            return _json_diff(_strip(expected), _strip(actual))
    try:
        old_lines = old.decode("utf-8").splitlines()
        new_lines = new.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return [f"binary content differs ({len(old)} -> {len(new)} bytes)"]
    diff = difflib.unified_diff(old_lines, new_lines, "expected", "merged", lineterm="", n=0)
    return [safe_line(line, MAX_LINE) for line in diff if not line.startswith(("---", "+++"))]


def check_sidecars(ctx: Context) -> CheckResult:
    """Tokenizer files and ``generation_config.json`` present and equal to the base's/adapter's."""
    options = ctx.settings
    merged = options.merged
    if merged is None:
        return CheckResult.skipped("no --merged-model")
    sources = [p for p in (options.base, options.adapter) if p is not None]
    if not sources:
        return CheckResult.skipped(
            "no --base-model or --adapter to compare sidecars with", needs=["--base-model"]
        )
    expected: dict[str, Path] = {}
    for name in SIDECAR_FILES:
        if options.adapter is not None and name in ADAPTER_MAY_SHIP and exists(
            options.adapter / name
        ):
            expected[name] = options.adapter / name
        elif options.base is not None and exists(options.base / name):
            expected[name] = options.base / name
    if not expected:
        return CheckResult.passed(
            "neither the base nor the adapter ships tokenizer or generation files"
        )
    missing = [n for n in expected if not exists(merged / n)]
    differing: dict[str, list[str]] = {}
    refused: list[str] = []
    for name, reference in expected.items():
        if name not in missing:
            try:
                lines = compare_file(reference, merged / name)
            except CheckpointError as exc:
                refused.append(one_line(exc))
                continue
            if lines:
                differing[name] = lines
    if refused:
        return CheckResult.failed(
            f"{refused[0]} (sidecar files are read only as regular files inside their folder)",
            refused[1:],
            refused=len(refused),
        )
    same = [n for n in expected if n not in missing and n not in differing]
    figures = {"compared": sorted(expected), "missing": missing, "differing": sorted(differing)}
    if not missing and not differing:
        origin = {str(p.parent.name) for p in expected.values()}
        return CheckResult.passed(
            f"{len(same)} sidecar file(s) identical to the {' and '.join(sorted(origin))}"
            f" copies: {', '.join(same)}",
            **figures,
        )
    parts = []
    if missing:
        parts.append(f"missing from the merge: {', '.join(missing)}")
    if differing:
        # the first differences inline, so the one-line warning already shows the diff
        first = [f"{n}: {lines[0].strip()}" for n, lines in sorted(differing.items())][:2]
        parts.append(f"differ: {', '.join(sorted(differing))} ({'; '.join(first)})")
    details = [f"{n}: expected {expected[n]}" for n in missing]
    for name, lines in sorted(differing.items()):
        details.append(f"{name} (vs {expected[name]}):")
        details.extend("  " + line for line in lines[:12])
        if len(lines) > 12:
            details.append(f"  ... {len(lines) - 12} more")
    return CheckResult(
        Outcome.WARNING,
        "sidecar files " + "; ".join(parts) + " (a user loading the merge gets different"
        " tokenization or decoding defaults)",
        details,
        figures,
    )
