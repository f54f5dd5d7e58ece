"""Deltas applied to part of what they cover: some experts of an MoE stack, one part of a fusion.

A merger that loops over experts and silently skips some (a bare ``try/except: return W`` in an
exporter), or that adds a fused projection's delta to its ``q`` rows only, leaves a tensor whose
every row is either exactly the correct merge or exactly the base. :func:`partial_rows` finds
that split and names it: the experts that hold the base values, or the fused parts (``q``, ``k``,
``v``; ``gate``, ``up``) the delta reached. In the per-expert layout each expert is its own
tensor; :func:`regroup_experts` names the same fault across the sibling tensors of one
parameter once the pass has judged them all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from harness.architectures import FUSED_PROJECTIONS
from harness.oracle.evidence import FIT_FRACTION, Evidence

if TYPE_CHECKING:
    import torch

    from harness.deltas import Plan
    from harness.oracle.compare import TensorCheck

#: The per-tensor diagnosis of an expert tensor that holds the base values.
_UNAPPLIED = "adapter not applied"


def _segments(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive row numbers as half-open ranges: ``[0, 1, 2, 5] -> [(0, 3), (5, 6)]``."""
    out: list[tuple[int, int]] = []
    for row in rows:
        if out and out[-1][1] == row:
            out[-1] = (out[-1][0], row + 1)
        else:
            out.append((row, row + 1))
    return out


def _ranges(rows: Sequence[int]) -> str:
    return ", ".join(f"{a}:{b}" for a, b in _segments(rows))


def fused_parts(module: str, config: Mapping[str, Any], size: int) -> list[tuple[str, int, int]]:
    """The named parts of a fused projection's output rows (empty when not known or not fitting).

    ``qkv_proj``-like modules split into ``q`` (heads x head_dim) then ``k`` and ``v`` (key/value
    heads x head_dim each); ``gate_up_proj`` into two halves.
    """
    labels = FUSED_PROJECTIONS.get(module.rsplit(".", 1)[-1])
    if labels is None:
        return []
    if len(labels) == 2:
        sizes = [size // 2, size - size // 2]
    else:
        heads = int(config.get("num_attention_heads") or config.get("n_head") or 0)
        hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
        if not heads or not hidden:
            return []
        head_dim = int(config.get("head_dim") or hidden // heads)
        kv = int(config.get("num_key_value_heads") or heads)
        sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
    if sum(sizes) != size:
        return []
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(label, start, start + n) for label, start, n in zip(labels, starts, sizes,
                                                                   strict=True)]


def _per_unit(inside: torch.Tensor, axis: int) -> torch.Tensor:
    """Whether each slice along ``axis`` fits (at least ``FIT_FRACTION`` of its elements)."""
    moved = inside.movedim(axis, 0)
    return moved.reshape(moved.shape[0], -1).double().mean(dim=1) >= FIT_FRACTION


def partial_rows(ev: Evidence) -> str | None:
    """Suspect: every row (expert) is either the correct merge or the base, and both occur."""
    import torch

    if not ev.edits or not all(e.additive for e in ev.edits) or ev.merged.dim() < 2:
        return None
    r, s = ev.reference
    edit = ev.edits[-1]
    axis = 1 if ev.merged.dim() == 2 and edit.transposed else 0
    zero = torch.zeros_like(ev.base)
    applied = _per_unit(ev.inside(r, s), axis)
    kept = _per_unit(ev.inside(ev.base, zero), axis)
    # units where the correct merge itself is indistinguishable from the base tell nothing
    silent = _per_unit(ev.inside(ev.base, zero, merged=r), axis)
    if bool((~applied & ~kept).any()):
        return None
    skipped = [i for i in range(len(kept)) if kept[i] and not silent[i]]
    reached = [i for i in range(len(applied)) if applied[i] and not silent[i]]
    if not skipped or not reached:
        return None
    parameter = getattr(edit, "parameter", "") or edit.module
    if ev.merged.dim() == 3:
        count = ev.merged.shape[0]
        return (
            f"delta applied to only some experts of {parameter}: expert(s)"
            f" {', '.join(map(str, skipped))} of {count} hold the base values (the merge skipped"
            " them)"
        )
    size = ev.merged.shape[axis]
    unit = "columns" if axis else "rows"
    parts = fused_parts(edit.module, ev.plan.target.config, size)
    if parts:
        got = [label for label, a, b in parts if all(i in reached or silent[i]
                                                     for i in range(a, b))]
        missed = [label for label, a, b in parts if any(i in skipped for i in range(a, b))]
        if got and missed and len(got) + len(missed) == len(parts):
            short = edit.module.rsplit(".", 1)[-1]
            return (
                f"delta applied to the {', '.join(got)} part(s) only of the fused {short} in"
                f" {edit.module}: {unit} {_ranges(reached)} carry it, {unit} {_ranges(skipped)}"
                f" ({', '.join(missed)}) hold the base values"
            )
    return (
        f"delta applied to {unit} {_ranges(reached)} only in {edit.module}: {unit}"
        f" {_ranges(skipped)} hold the base values"
    )


def regroup_experts(checks: Sequence[TensorCheck], plan: Plan) -> None:
    """Name skipped experts across a parameter's per-expert tensors (rewrites diagnoses)."""
    by_parameter: dict[str, dict[int, TensorCheck]] = defaultdict(dict)
    counts: dict[str, int] = {}
    for check in checks:
        for edit in plan.for_tensor(check.name):
            expert = getattr(edit, "expert", None)
            if edit.kind == "lora-expert" and expert is not None:
                parameter = str(getattr(edit, "parameter", ""))
                counts[parameter] = int(getattr(edit, "experts", 0))
                # a part of an expert failing makes the expert fail
                known = by_parameter[parameter].get(expert)
                if known is None or known.ok:
                    by_parameter[parameter][expert] = check
    for parameter, experts in by_parameter.items():
        skipped = sorted(e for e, c in experts.items()
                         if not c.ok and (c.diagnosis or "").startswith(_UNAPPLIED))
        if not skipped:
            continue
        applied = [e for e, c in experts.items() if c.ok]
        if applied:
            cause = (
                f"delta applied to only some experts of {parameter}: expert(s)"
                f" {', '.join(map(str, skipped))} of {counts[parameter]} hold the base values"
                " (the merge skipped them)"
            )
        else:
            cause = (
                f"delta applied to none of the {counts[parameter]} experts of {parameter} (every"
                " expert tensor holds the base values: the merge skipped the expert parameter)"
            )
        for check in checks:
            edits = plan.for_tensor(check.name)
            if (not check.ok and (check.diagnosis or "").startswith(_UNAPPLIED)
                    and any(getattr(e, "parameter", None) == parameter for e in edits)):
                check.diagnosis = cause
