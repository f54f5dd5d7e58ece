"""A vocabulary grown before training: the rows a merge adds, and what in the adapter explains them.

The usual flow adds tokens, calls ``resize_token_embeddings`` and trains with ``modules_to_save``
or trainable tokens on the embedding and head; the resized base is never saved. The merge then
has more rows than the base the user gives. Each new row is still known exactly when the adapter
carries it: a full copy (``modules_to_save``, or the resized ``base_layer`` weight peft saves
with the adapter when the vocabulary changed) holds every row, and trainable tokens hold the rows
they index. A grown tensor is accepted when its new rows are all explained that way; the oracle
then checks the old rows against the base and the new rows against the adapter's values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.deltas.tokens import Copy, TokenRows

if TYPE_CHECKING:
    from harness.deltas import Plan
    from harness.io.safetensors import TensorInfo


@dataclass(frozen=True)
class Growth:
    """One tensor with more rows in the merge than in the base, and what explains them."""

    tensor: str
    base_rows: int
    rows: int
    #: The edits that hold the new rows (``modules_to_save copy``, ``trainable tokens ...``).
    sources: tuple[str, ...]

    def describe(self) -> str:
        """``model.embed_tokens.weight 128 -> 133 rows (modules_to_save copy)``."""
        return f"{self.tensor} {self.base_rows} -> {self.rows} rows ({', '.join(self.sources)})"

    @property
    def extra_rows(self) -> int:
        """Rows the merge added."""
        return self.rows - self.base_rows


@dataclass
class Growths:
    """Every grown tensor of a merge: explained ones, and the rest with their causes."""

    explained: dict[str, Growth] = dataclasses.field(default_factory=dict)
    unexplained: dict[str, str] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        """The explained growths on one line."""
        return "; ".join(g.describe() for g in self.explained.values())


def _token_span(edit: TokenRows) -> str:
    low, high = min(edit.indices), max(edit.indices)
    return f"trainable tokens {low}..{high}" if len(edit.indices) > 1 else f"token {low}"


def _explain(name: str, base: TensorInfo, merged: TensorInfo, plan: Plan) -> Growth | str | None:
    """The growth of one tensor, why the adapter does not explain it, or None (no growth)."""
    base_rows, rows = base.shape[0] if base.shape else 0, merged.shape[0] if merged.shape else 0
    if len(base.shape) != len(merged.shape) or base.shape[1:] != merged.shape[1:] or (
        rows <= base_rows
    ):
        return None
    edits = plan.for_tensor(name)
    full = [e for e in edits if isinstance(e, Copy)
            and tuple(e.adapter.tensors[e.key].shape) == tuple(merged.shape)]
    if full:
        return Growth(name, base_rows, rows, tuple(dict.fromkeys(e.describe() for e in full)))
    tokens = [e for e in edits if isinstance(e, TokenRows)]
    covered = {i for e in tokens for i in e.indices}
    missing = [i for i in range(base_rows, rows) if i not in covered]
    if tokens and not missing:
        return Growth(name, base_rows, rows, tuple(dict.fromkeys(_token_span(e) for e in tokens)))
    where = f"rows {base_rows}..{rows - 1}"
    if missing and tokens:
        where = f"rows {missing[0]}..{missing[-1]} ({len(missing)} of the {rows - base_rows} new)"
    return (
        f"{rows - base_rows} rows more than the base ({base_rows} -> {rows}) and the adapter"
        f" holds no value for {where}: the new rows cannot be verified (save the adapter with"
        " its embedding layers, or train the new tokens with modules_to_save or trainable"
        " tokens)"
    )


def explain_growth(plan: Plan, merged: Mapping[str, TensorInfo]) -> Growths:
    """Compare ``merged``'s shapes with the base's; explain every difference from the plan."""
    found = Growths()
    base = plan.target.tensors
    for name, info in merged.items():
        base_info = base.get(name)
        if base_info is None and name == plan.tied_head and plan.target.tie_source is not None:
            base_info = base[plan.target.tie_source]
        if base_info is None or base_info.shape == info.shape:
            continue
        outcome = _explain(name, base_info, info, plan)
        if isinstance(outcome, Growth):
            found.explained[name] = outcome
        elif outcome is not None:
            found.unexplained[name] = outcome
    return found


def grow(plan: Plan, growths: Growths) -> None:
    """Give the edits of grown tensors the grown shape (they were planned against the base)."""
    for name, growth in growths.explained.items():
        edits = list(plan.for_tensor(name))
        if name == plan.target.tie_source and plan.tied_head is not None:
            edits += plan.for_tensor(plan.tied_head)  # the tied head grew with it
        for edit in edits:
            if edit.info.shape[0] != growth.rows:
                edit.info = dataclasses.replace(edit.info, shape=(growth.rows,
                                                                  *edit.info.shape[1:]))


def needed_rows(plan: Plan) -> dict[str, tuple[int, int]]:
    """Tensors whose edits need more rows than the base has: ``name -> (base rows, needed)``."""
    needs: dict[str, tuple[int, int]] = {}
    for name, edits in plan.edits.items():
        for edit in edits:
            rows = edit.rows_needed()
            base_rows = edit.info.shape[0] if edit.info.shape else 0
            if rows > base_rows:
                known = needs.get(name, (base_rows, 0))[1]
                needs[name] = (base_rows, max(rows, known))
    return needs
