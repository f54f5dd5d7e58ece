"""A PNG of the per-layer weight-difference table: expected vs found delta norms, layer by layer.

The weight oracle puts one row per targeted tensor in its check's result as
``result.layers = [{"tensor", "expected_norm", "found_norm", "ratio"}, ...]`` where
``expected_norm`` is ``||R - W||`` (the reference delta), ``found_norm`` is ``||M - W||`` (what
the merge actually added) and ``ratio`` is found / expected. A correct merge sits on ratio 1
everywhere; a skipped layer drops to 0, a doubled merge rises to 2, an rsLoRA scale mistake
shifts a whole family of tensors by sqrt(r).

matplotlib is optional (``pip install 'pytest-merge-harness[plot]'``); it is imported only here
and only when a plot is asked for, with the non-interactive Agg canvas (no display needed).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.io.output import write_atomic
from harness.run.result import CheckResult

ROW_KEYS = ("tensor", "expected_norm", "found_norm", "ratio")


def layer_rows(results: Iterable[CheckResult]) -> list[dict[str, Any]]:
    """The per-tensor rows of every result that carries layers (valid rows only)."""
    rows: dict[str, dict[str, Any]] = {}
    for result in results:
        for row in result.layers:
            # Several weight checks may carry the same table: keep one row per tensor.
            if isinstance(row, Mapping) and all(k in row for k in ROW_KEYS):
                rows.setdefault(str(row["tensor"]), {k: row[k] for k in ROW_KEYS})
    return list(rows.values())


def short_name(tensor: str) -> str:
    """A compact label: ``model.layers.3.self_attn.q_proj.weight`` -> ``3.q_proj``."""
    name = re.sub(r"\.(weight|bias)$", "", tensor)
    match = re.search(r"\.(\d+)\.(?:.*\.)?([^.]+)$", name)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    return name.rsplit(".", 1)[-1]


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot_layers(rows: list[dict[str, Any]], path: Path, *, title: str = "weight deltas") -> Path:
    """Draw expected vs found delta norms (top) and their ratio (bottom) per tensor; save a PNG.

    Raises ImportError when matplotlib is not installed, OutputError when the file cannot be
    written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [short_name(str(r["tensor"])) for r in rows]
    expected = [_number(r["expected_norm"]) for r in rows]
    found = [_number(r["found_norm"]) for r in rows]
    ratio = [_number(r["ratio"]) for r in rows]
    x = list(range(len(rows)))
    width = min(24.0, max(7.0, 0.28 * len(rows) + 2.0))
    figure = Figure(figsize=(width, 6.5), dpi=110)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    bar = 0.4
    top.bar([i - bar / 2 for i in x], expected, bar, label="expected ‖R − W‖", color="#4C72B0")
    top.bar([i + bar / 2 for i in x], found, bar, label="found ‖M − W‖", color="#DD8452")
    top.set_ylabel("delta norm")
    positive = [v for v in expected + found if v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) > 100:
        top.set_yscale("log")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(title, fontsize=10)
    top.grid(axis="y", alpha=0.3)
    # A missing ratio (no delta expected for that tensor) is not drawn.
    shown = [(i, r) for i, r in zip(x, ratio, strict=True) if math.isfinite(r)]
    finite = [r for _, r in shown] or [1.0]
    colors = ["#55A868" if abs(r - 1.0) <= 0.01 else "#C44E52" for _, r in shown]
    bottom.scatter([i for i, _ in shown], [r for _, r in shown], c=colors, s=18, zorder=3)
    bottom.axhline(1.0, color="#333333", linewidth=0.8, linestyle="--", label="ratio 1 (correct)")
    bottom.set_ylabel("found / expected")
    top_ratio = max([1.5, *finite]) * 1.1
    bottom.set_ylim(min(0.0, *finite) - 0.05, top_ratio)
    bottom.grid(axis="y", alpha=0.3)
    bottom.legend(loc="upper right", fontsize=8)
    bottom.set_xticks(x)
    bottom.set_xticklabels(labels, rotation=90, fontsize=7 if len(rows) > 40 else 8)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png")
    # like every output: a temporary file beside it, synced, renamed; never through a symlink
    return write_atomic(path, image.getvalue())
