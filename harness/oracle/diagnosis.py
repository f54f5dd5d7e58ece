"""Name the fault behind a failed tensor: a registry of usual suspects, each tested, first fit wins.

Every suspect builds the tensor a specific faulty merge would have produced (the base unchanged,
the delta scaled by a wrong factor, transposed, taken from another layer, DoRA's magnitude
dropped, ...) and asks whether the observed merged tensor lies within that alternative's own
rounding bound (doubled, so a faulty path that rounds twice still fits) for at least 99.9 % of its
elements. Suspects are mutually distinguishable at the scale of the delta, so at most one fits a
real fault; when none does the answer is "no known fault fits".
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from harness.deltas.apply import rounded_paths
from harness.io.safetensors import TensorInfo, tensor_from_bytes
from harness.oracle.compare import TensorCheck
from harness.oracle.evidence import NO_FIT, Evidence, Suspect
from harness.oracle.partial import partial_rows
from harness.ulp import compute_dtype, ulp

if TYPE_CHECKING:
    import torch

    from harness.deltas import Edit, Plan

__all__ = ["NO_FIT", "SUSPECTS", "diagnose"]


def _additive(evidence: Evidence) -> list[Edit]:
    return [e for e in evidence.edits if e.additive]


def _not_applied(ev: Evidence) -> str | None:
    import torch

    if not ev.edits or not ev.fits(ev.base, torch.zeros_like(ev.base)):
        return None
    kinds = {e.kind for e in ev.edits}
    if kinds <= {"modules_to_save"}:
        return (
            f"modules_to_save copy of {ev.check.name} not written (the merged tensor is the"
            " base's)"
        )
    if kinds <= {"trainable-tokens", "modules_to_save"}:
        return "trainable token rows not written (the merged tensor is the base's)"
    return "adapter not applied (the merged tensor equals the base)"


def _scaled(ev: Evidence) -> str | None:
    r, s = ev.reference
    for edit in _additive(ev):
        delta = ev.step_delta(edit)
        for label, factor in edit.alternatives():
            if not math.isfinite(factor) or abs(factor - 1) < 1e-9:
                continue
            if ev.fits(r + delta * (factor - 1), s * max(1.0, abs(factor))):
                return f"{label} in {edit.module}"
    return None


def _transposed(ev: Evidence) -> str | None:
    r, s = ev.reference
    for edit in _additive(ev):
        delta = ev.step_delta(edit)
        flipped = edit.transposed
        if delta.dim() != 2:
            continue
        if delta.shape[0] == delta.shape[1]:
            label = (
                "delta not transposed (fan_in_fan_out ignored)" if flipped else "delta transposed"
            )
            if ev.fits(r - delta + delta.T, s + s.T):
                return f"{label} in {edit.module}"
        elif flipped:
            reshaped = delta.T.contiguous().reshape(delta.shape)
            if ev.fits(r - delta + reshaped, s * 2):
                return f"fan_in_fan_out ignored in {edit.module}: delta reshaped, not transposed"
    return None


def _variant_ignored(ev: Evidence) -> str | None:
    for edit in ev.edits:
        plain = edit.without_variant()
        if plain is None:
            continue
        step = plain.reference(ev.base.clone(), None, slice(None), ev.code)
        if ev.fits(step.value, step.bound):
            return f"DoRA magnitude ignored in {edit.module} (merged as plain LoRA)"
    return None


def _ia3_twice(ev: Evidence) -> str | None:
    """An (IA)^3 vector multiplied in twice (``W * l * l``): merged twice, or on a merge."""
    for edit in ev.edits:
        if edit.kind != "ia3":
            continue
        once = edit.reference(ev.base.clone(), None, slice(None), ev.code)
        twice = edit.reference(once.value, once.bound, slice(None), ev.code)
        if ev.fits(twice.value, twice.bound):
            return f"IA3 vector applied twice in {edit.module} (W * l * l)"
    return None


def _candidates(ev: Evidence) -> Iterator[Edit]:
    """Additive edits of *other* tensors whose delta has this tensor's shape."""
    mine = {id(e) for e in ev.edits}
    shape = tuple(ev.base.shape)
    for edit in ev.plan.all_edits():
        if id(edit) in mine or not edit.additive or tuple(edit.info.shape) != shape:
            continue
        yield edit


def _ranked(ev: Evidence, target: torch.Tensor) -> list[tuple[float, Edit, torch.Tensor]]:
    import torch

    scored = []
    norm = float(torch.linalg.vector_norm(target))
    for edit in _candidates(ev):
        delta = ev.own_delta(edit)
        dn = float(torch.linalg.vector_norm(delta))
        if norm and dn:
            scored.append((float((target * delta).sum()) / (norm * dn), edit, delta))
    scored.sort(key=lambda item: -item[0])
    return scored[:3]


def _wrong_layer(ev: Evidence) -> str | None:
    if not _additive(ev):
        return None
    _, s = ev.reference
    for _, edit, delta in _ranked(ev, ev.found):
        if ev.fits(ev.base + delta, s):
            return f"delta of {edit.module} applied here instead of this module's (wrong layer)"
    return None


def _tied_label(ev: Evidence, edit: Edit) -> str | None:
    source = ev.plan.target.tie_source
    if source is None or ev.base_name != source or edit.base != source:
        return None
    return (
        f"tied embeddings: {ev.check.name} carries the delta of {edit.module}; the merge kept the"
        " input embedding and output head tied although the adapter changes only one of them"
        " (peft's merge_and_unload does this, peft#2777): store the head separately and set"
        " tie_word_embeddings=false"
    )


def _non_target(ev: Evidence) -> str | None:
    import torch

    if ev.edits:
        return None
    for _, edit, delta in _ranked(ev, ev.found):
        if ev.fits(ev.base + delta, torch.zeros_like(delta)):
            return _tied_label(ev, edit) or (
                f"non-target tensor modified: it received the delta of {edit.module}"
            )
    source = ev.plan.target.tie_source
    if source is not None and ev.base_name == source:
        for edit in ev.plan.for_tensor(source) + ev.plan.for_tensor(ev.plan.tied_head or ""):
            if edit.base == source:
                label = _tied_label(ev, edit)
                if label:
                    return label
    changed = ev.check.changed
    biggest = float(ev.found.abs().max()) if ev.found.numel() else 0.0
    return f"non-target tensor modified: {changed} elements differ, max |M-W| {biggest:.4g}"


def _fitted_scale(ev: Evidence) -> str | None:
    additive = _additive(ev)
    if len(additive) != 1:
        return None
    edit = additive[0]
    delta = ev.step_delta(edit)
    r, s = ev.reference
    denominator = float((delta * delta).sum())
    if not denominator:
        return None
    factor = float((ev.found * delta).sum()) / denominator
    if abs(factor - 1) < 1e-3 or not math.isfinite(factor):
        return None
    if ev.fits(r + delta * (factor - 1), s * max(1.0, abs(factor))):
        scale = edit.scale
        extra = f" (effective scale {scale * factor:.4g}, expected {scale:.4g})" if scale else ""
        return f"scale off by x{factor:.4g} in {edit.module}{extra}"
    return None


def _other_adapter(ev: Evidence) -> str | None:
    import torch

    ranks = [e.rank for e in _additive(ev)]
    if not ranks or ev.found.dim() != 2:
        return None
    known = [r for r in ranks if r is not None]
    if len(known) != len(ranks):
        return None
    rank = sum(known)
    if min(ev.found.shape) <= rank + 1 or ev.found.numel() > 1 << 24:
        return None
    r, s = ev.reference
    noise = float(torch.linalg.vector_norm(ulp(r.abs() + s, ev.code) * max(ev.k, 1.0) + s)) * 2
    values = torch.linalg.svdvals(ev.found.double())
    tail = float(torch.linalg.vector_norm(values[rank:]))
    if not float(values[0]) or tail > noise:
        return None
    expected = r - ev.base
    norm = float(torch.linalg.vector_norm(expected)) * float(torch.linalg.vector_norm(ev.found))
    corr = float((expected * ev.found).sum()) / norm if norm else 0.0
    if abs(corr) > 0.9:
        return None
    return (
        f"a different adapter: the change is a rank-<={rank} update unrelated to this adapter's"
        f" delta (correlation {corr:.2f})"
    )


#: The suspects, tested in this order; the first that fits names the fault.
SUSPECTS: list[Suspect] = [
    Suspect("not applied", _not_applied),
    Suspect("applied to some rows or experts only", partial_rows),
    Suspect("wrong scale", _scaled),
    Suspect("transposed delta", _transposed),
    Suspect("DoRA magnitude ignored", _variant_ignored),
    Suspect("IA3 vector applied twice", _ia3_twice),
    Suspect("delta from another layer", _wrong_layer),
    Suspect("non-target tensor modified", _non_target),
    Suspect("scale off by a factor", _fitted_scale),
    Suspect("a different adapter", _other_adapter),
]


def diagnose(
    check: TensorCheck,
    edits: list[Edit],
    plan: Plan,
    info: TensorInfo,
    merged: bytearray,
    base_info: TensorInfo,
    base: bytearray,
    k: float,
) -> str:
    """The first suspect that fits a failed tensor, or :data:`NO_FIT`."""
    if info.shape != base_info.shape:
        return NO_FIT
    code = info.dtype
    cd = compute_dtype(code)
    merged_values = tensor_from_bytes(info, merged).to(cd)
    base_values = tensor_from_bytes(base_info, base).to(cd)
    found = _first_fit(Evidence(check, code, k, merged_values, base_values, list(edits), plan,
                                base_info.name))
    if found is None:
        # the same fault in a merge that held its factors in the stored dtype
        twins = rounded_paths(edits, code)
        if twins is not None:
            found = _first_fit(Evidence(check, code, k, merged_values, base_values, twins, plan,
                                        base_info.name))
            if found is not None:
                found += f" (a merge with the LoRA factors held in {code.lower()})"
    return found or NO_FIT


def _first_fit(evidence: Evidence) -> str | None:
    for suspect in SUSPECTS:
        try:
            found = suspect.test(evidence)
        except (RuntimeError, ValueError):  # a suspect that does not apply to this shape
            found = None
        if found:
            return found
    return None
