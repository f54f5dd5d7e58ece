"""The ``export`` family: each ``--export`` file (a GGUF) is the merged model, faithfully.

Per export, items named ``<check>[<file name>]``:

* ``model``: the file is a readable GGUF of this model (architecture, dimensions), and every
  tensor on both sides is accounted for (present, or absent for a named reason);
* ``values``: every tensor re-encodes to the exported bytes (F32/F16/BF16 and every type gguf can
  quantize), or decodes within its type's bound (K-quants, IQ types); the first differing block
  is named;
* ``provenance`` (with a base): the retention ratio tells a faithful export (about 1) from one
  converted from the base (0) or from a model merged twice (2);
* ``tokenizer``, ``chat_template``, ``parameters``: the metadata equals what the merged folder
  gives the converter.

The engine is :mod:`harness.export`, imported on first use: it needs the optional ``gguf``
package, which a run without ``--export`` must not require.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.run.check import Check
from harness.run.context import Context, Key
from harness.run.result import CheckResult, Family, Outcome
from harness.run.settings import Settings

if TYPE_CHECKING:
    from harness.export.layout import Layout
    from harness.export.reader import ExportFile
    from harness.export.values import TensorReport, ValueResult

#: Rows of the per-tensor table shown in a check's details.
TABLE_ROWS = 8


def _opened(ctx: Context, path: Path) -> ExportFile:
    from harness.export.reader import open_export

    return ctx.memo(Key(f"export:open:{path}"), lambda: open_export(path))


def _layout(ctx: Context, path: Path) -> Layout:
    from harness.export.layout import plan

    return ctx.memo(Key(f"export:layout:{path}"), lambda: plan(_opened(ctx, path), ctx.merged()))


def _values(ctx: Context, path: Path) -> ValueResult:
    from harness.export.values import compare_values

    def compute() -> ValueResult:
        layout = _layout(ctx, path)
        base = ctx.base() if ctx.has_base else None
        return compare_values(_opened(ctx, path), layout, ctx.merged(), base)

    return ctx.memo(Key(f"export:values:{path}"), compute)


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_model(ctx: Context, path: Path) -> CheckResult:
    """The file is a GGUF of this model and accounts for every tensor on both sides."""
    export = _opened(ctx, path)
    layout = _layout(ctx, path)
    problems: list[str] = []
    if layout.shapes:
        name, text = next(iter(layout.shapes.items()))
        problems.append(
            f"not an export of this model: {len(layout.shapes)} tensor shape(s) differ, first"
            f" {name}: {text}"
        )
    if layout.missing:
        problems.append(
            f"{len(layout.missing)} merged tensor(s) missing from the export: "
            + _names(layout.missing)
        )
    if layout.unmapped:
        problems.append(
            f"{len(layout.unmapped)} merged tensor(s) with no GGUF name for"
            f" {layout.architecture}: " + _names(layout.unmapped)
        )
    if layout.unexplained:
        problems.append(
            f"{len(layout.unexplained)} exported tensor(s) with no merged counterpart: "
            + _names(layout.unexplained)
        )
    accounted = [f"{k}: {v}" for k, v in {**layout.omitted, **layout.generated}.items()]
    figures: dict[str, Any] = {
        "architecture": layout.architecture,
        "tensors": len(export.tensors),
        "bytes": export.size,
        "parts": [p.name for p in export.parts],
        "omitted": layout.omitted,
        "generated": layout.generated,
    }
    if problems:
        return CheckResult.failed(problems[0], problems[1:] + accounted, metrics=figures)
    transformed = sorted({t for s in layout.sources.values() for t in s.transforms()})
    sources = sum(len(s.parts) for s in layout.sources.values())
    note = f"; transforms undone: {', '.join(transformed)}" if transformed else ""
    absent = f"; {len(accounted)} accounted absent ({_names(accounted, 2)})" if accounted else ""
    return CheckResult(
        Outcome.PASSED,
        f"a {layout.architecture} GGUF of this model: {len(layout.sources)} tensor(s) from"
        f" {sources} merged tensor(s){note}{absent}",
        accounted,
        figures,
    )


def _row(report: TensorReport) -> str:
    status = "ok" if report.ok else f"{report.differing}/{report.blocks} blocks differ"
    return f"{report.name} | {report.type} | {report.method} | {status}"


def _failure(report: TensorReport) -> str:
    assert report.first_block is not None
    text = f"block {report.first_block} of tensor {report.name} differs"
    if report.method == "bounded":
        text += f": error {report.worst_error:.4g} > bound {report.worst_bound:.4g}"
    return (
        f"{text} ({report.type}, {report.method}; {report.where}; {report.differing} of"
        f" {report.blocks} blocks)"
    )


def check_values(ctx: Context, path: Path) -> CheckResult:
    """Every tensor re-encodes to the exported bytes, or decodes within its type's bound."""
    from harness.export.encoding import BOUND_TEXT

    result = _values(ctx, path)
    if not result.tensors:
        return CheckResult.failed("no exported tensor maps to the merged model")
    failing = result.failing()
    types = sorted({r.type for r in result.tensors})
    methods: dict[str, int] = {}
    for report in result.tensors:
        methods[report.method] = methods.get(report.method, 0) + 1
    figures: dict[str, Any] = {
        "seconds": round(result.seconds, 4),
        "bytes_read": result.bytes_read,
        "methods": methods,
        "tensors": [r.to_json() for r in result.tensors],
    }
    table = [_row(r) for r in (failing or result.tensors)[:TABLE_ROWS]]
    if "bounded" in methods:
        table.insert(0, f"bound: {BOUND_TEXT}")
    if failing:
        more = f" (and {len(failing) - 1} more tensor(s))" if len(failing) > 1 else ""
        return CheckResult.failed(_failure(failing[0]) + more, table, metrics=figures)
    how = ", ".join(f"{n} {m}" for m, n in sorted(methods.items()))
    return CheckResult(
        Outcome.PASSED,
        f"{len(result.tensors)} tensor(s) match the merged model ({how}; types {', '.join(types)})",
        table,
        figures,
    )


def check_provenance(ctx: Context, path: Path) -> CheckResult:
    """The export retains the merge: about 1, not 0 (the base) or 2 (merged twice)."""
    from harness.export.provenance import VERDICTS, describe, judge

    if not ctx.has_base:
        return CheckResult.skipped("no --base-model given: provenance compares with the base")
    result = _values(ctx, path)
    confidence = ctx.settings.config.confidence
    judgement = judge(
        {r.name: r.retention for r in result.tensors if r.retention is not None}, confidence
    )
    if not judgement.tensors:
        return CheckResult.skipped("the merged model equals the base: no change to trace")
    text = describe(judgement.interval, confidence)
    figures = {
        "retention": judgement.interval.to_json(),
        "per_tensor": {name: i.to_json() for name, i in judgement.tensors.items()},
        "undecided": judgement.undecided,
    }
    details = [f"{name}: {describe(i, confidence)}" for name, i in judgement.tensors.items()]
    details = details[:TABLE_ROWS]
    if not judgement.targets:
        return CheckResult(
            Outcome.INCONCLUSIVE,
            f"no changed tensor's retention is decided: the merge's change is below the"
            f" export's precision in all {len(judgement.tensors)}",
            details, figures,
        )
    if judgement.mixed:
        kept = judgement.targets.get(1.0, [])
        lost = judgement.targets.get(0.0, [])
        other = [n for t, names in judgement.targets.items() if t not in (0.0, 1.0)
                 for n in names]
        head = "partly merged" if lost and kept else "inconsistent"
        return CheckResult.failed(
            f"{head}: {len(lost)} changed tensor(s) hold the base ({_names(lost)}),"
            f" {len(kept)} the merged model, {len(other)} neither; retention {text}",
            details, metrics=figures,
        )
    target = judgement.verdict
    changed = len(judgement.tensors)
    if target == 1.0:
        undecided = (
            f" ({len(judgement.undecided)} undecided: {_names(judgement.undecided)})"
            if judgement.undecided else ""
        )
        return CheckResult(
            Outcome.PASSED,
            f"made from the merged model: retention {text} over {changed} changed"
            f" tensor(s){undecided}",
            details, figures,
        )
    if target is None:
        return CheckResult.failed(
            f"retention {text}: neither the merged model (1), the base (0) nor a double"
            " merge (2): converted from another model, or merged at another scale",
            details, metrics=figures,
        )
    return CheckResult.failed(
        f"{VERDICTS[target]}: the export retains {text} of the merge", details, metrics=figures
    )


def check_tokenizer(ctx: Context, path: Path) -> CheckResult:
    """Tokens, scores or merges, token types, added tokens and special ids equal the merged's."""
    from harness.export.vocabulary import (
        compare_vocabularies,
        expected_vocabulary,
        exported_vocabulary,
    )

    export = _opened(ctx, path)
    merged = ctx.merged()
    found = exported_vocabulary(export)
    expected = expected_vocabulary(
        merged.root, merged.config or {}, found.model, export.architecture
    )
    lines = compare_vocabularies(expected, found)
    if lines:
        return CheckResult.failed(f"tokenizer differs: {lines[0]}", lines[1:])
    parts = "merges" if found.merges else "scores" if found.scores else "types"
    return CheckResult.passed(
        f"the merged tokenizer: {len(found.tokens)} tokens ({found.model}), {parts}, token types"
        f" and special ids {sorted(found.special) or 'none'} equal",
        tokens=len(found.tokens),
    )


def check_chat_template(ctx: Context, path: Path) -> CheckResult:
    """The chat template equals the merged folder's."""
    from harness.export.vocabulary import expected_templates, exported_templates

    expected = expected_templates(ctx.merged().root)
    found = exported_templates(_opened(ctx, path))
    if expected == found:
        if not expected:
            return CheckResult.passed("no chat template in the merged folder or the export")
        return CheckResult.passed(f"chat template(s) {', '.join(sorted(expected))} equal")
    lines = []
    for name in sorted(set(expected) | set(found)):
        want, have = expected.get(name), found.get(name)
        if want == have:
            continue
        if want is None:
            lines.append(f"{name}: the export has one ({len(have or '')} characters), the merged"
                         " folder none")
        elif have is None:
            lines.append(f"{name}: the merged folder has one ({len(want)} characters), the"
                         " export none")
        else:
            pairs = zip(want, have, strict=False)
            at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(want), len(have)))
            lines.append(
                f"{name}: merged {len(want)} characters, export {len(have)}; first difference at"
                f" character {at}: merged {want[at:at + 30]!r}, export {have[at:at + 30]!r}"
            )
    return CheckResult.failed(f"chat template differs: {lines[0]}", lines[1:])


def check_parameters(ctx: Context, path: Path) -> CheckResult:
    """Context length, rope, head counts, norm epsilon, vocabulary size equal the config's."""
    from harness.export.parameters import compare_parameters

    export = _opened(ctx, path)
    mismatches, compared = compare_parameters(export, ctx.merged().config or {})
    if mismatches:
        lines = [m.line() for m in mismatches]
        return CheckResult.failed(
            lines[0] + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""),
            lines[1:],
            mismatches={m.name: {"merged": m.merged, "export": m.export} for m in mismatches},
        )
    return CheckResult.passed(f"{compared} architecture parameter(s) equal the merged config")


#: (name, function, description) of each check, in run order.
SPEC: tuple[tuple[str, Callable[[Context, Path], CheckResult], str], ...] = (
    ("model", check_model, "a readable GGUF of this model; every tensor accounted for"),
    ("values", check_values, "every tensor re-encodes exactly or decodes within its bound"),
    ("provenance", check_provenance, "made from the merged model, not the base or a double merge"),
    ("tokenizer", check_tokenizer, "tokens, scores/merges, types, special ids equal the merged"),
    ("chat_template", check_chat_template, "the chat template equals the merged folder's"),
    ("parameters", check_parameters, "context length, rope, heads, norm eps, vocab size equal"),
)


def _labels(paths: tuple[Path, ...]) -> list[str]:
    """Each export's label: its file name, made unique with its position when names repeat."""
    names = [p.name for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def _guarded(
    run: Callable[[Context, Path], CheckResult], path: Path
) -> Callable[[Context], CheckResult]:
    def check(ctx: Context) -> CheckResult:
        if ctx.settings.merged is None:
            return CheckResult.failed("an export is compared with --merged-model: none given")
        try:
            return run(ctx, path)
        except ImportError as exc:
            raise HarnessError(
                f"the export checks need the gguf extra ({exc.name or exc}): pip install"
                " 'pytest-merge-harness[gguf]'"
            ) from None

    return functools.update_wrapper(check, run)


def checks(settings: Settings) -> list[Check]:
    """The export family: one item per export and check."""
    found: list[Check] = []
    for path, label in zip(settings.exports, _labels(settings.exports), strict=True):
        for name, run, description in SPEC:
            found.append(
                Check(Family.EXPORT, f"{name}[{label}]", description, _guarded(run, path))
            )
    return found
