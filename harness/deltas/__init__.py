"""The delta registry: ``peft_type`` -> how that adapter type changes base tensors.

Each entry turns an adapter folder (config and saved keys) into :class:`~harness.deltas.base.Edit`
objects, one per changed tensor, that compute the exact reference and peft's own merge. The
registry is the only place adapter types are distinguished; an unknown type is reported as not
verifiable by name, never passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from harness.deltas.base import Edit, Step, Target
from harness.deltas.ia3 import Ia3Type
from harness.deltas.lora import LoraType
from harness.deltas.lycoris import LohaType, LokrType
from harness.deltas.tokens import Copy, TokenRows, TokensType, copies
from harness.errors import UnsupportedAdapterError
from harness.io.adapter import validate_config
from harness.io.patterns import module_names, screen

if TYPE_CHECKING:
    from harness.io.adapter import Adapter

__all__ = ["REGISTRY", "AdapterType", "Edit", "Plan", "Step", "Target", "plan_adapters"]


class AdapterType(Protocol):
    """A registry entry: plans the edits of one adapter of its ``peft_type``."""

    peft_type: str

    def plan(self, adapter: Adapter, index: int, target: Target) -> list[Edit]:
        """The edits of ``adapter`` (the ``index``-th merged) on the base ``target``."""
        ...


#: peft_type -> implementation. Types peft merges in ways not listed here are refused by name.
REGISTRY: dict[str, AdapterType] = {
    entry.peft_type: entry
    for entry in (LoraType(), Ia3Type(), LohaType(), LokrType(), TokensType())
}


@dataclass
class Plan:
    """Every edit of a sequence of adapters, grouped by the logical tensor it changes."""

    target: Target
    #: logical tensor name -> edits in merge order (adapter order, then copies, rows, deltas).
    edits: dict[str, list[Edit]] = field(default_factory=dict)
    #: The output head's logical name when the base ties it to ``target.tie_source``.
    tied_head: str | None = None

    def add(self, edit: Edit, tensor: str | None = None) -> None:
        """Append one edit to its tensor's list (or to ``tensor``'s, for a mirrored edit)."""
        self.edits.setdefault(tensor or edit.tensor, []).append(edit)

    def for_tensor(self, name: str) -> list[Edit]:
        """The edits of one logical tensor (empty for an untouched one)."""
        return self.edits.get(name, [])

    def touches_tie(self) -> bool:
        """Whether any edit changes the tied input embedding or output head."""
        source = self.target.tie_source
        if source is None or self.tied_head is None:
            return False
        return bool(self.for_tensor(source) or self.for_tensor(self.tied_head))

    def release(self) -> None:
        """Drop every edit's cached adapter tensors."""
        for edits in self.edits.values():
            for edit in edits:
                edit.release()

    def all_edits(self) -> list[Edit]:
        """Every edit, in tensor-name order."""
        return [e for name in sorted(self.edits) for e in self.edits[name]]


def plan_adapter(adapter: Adapter, index: int, target: Target) -> list[Edit]:
    """Validate one adapter and plan its edits; raise a HarnessError with a one-line cause."""
    entry = REGISTRY.get(adapter.peft_type)
    if entry is None:
        raise UnsupportedAdapterError(
            f"adapter type {adapter.peft_type} is not verifiable by merge-harness (verifiable:"
            f" {', '.join(sorted(REGISTRY))})"
        )
    validate_config(adapter)
    # peft's own regex matches, replayed within a time budget: a catastrophic pattern is refused
    # here instead of hanging the planning below (or peft, in the behaviour checks)
    names = module_names([*target.tensors, *(m + ".x" for m in adapter.layout.modules)])
    screen(adapter.config, names, adapter.patterns)
    edits = copies(adapter, index, target) + entry.plan(adapter, index, target)
    for edit in edits:
        edit.check()
    return edits


def plan_adapters(adapters: Sequence[Adapter], target: Target) -> Plan:
    """The merge plan of ``adapters`` applied in sequence to the base ``target``.

    With a tied base, the output head keeps its own logical name (``lm_head.weight``): an edit
    of the head and an edit of the input embedding are distinct, as they are in the unmerged
    model, and trainable-token rows of the embedding also apply to the tied head (peft ties that
    adapter to the head).
    """
    plan = Plan(target)
    source = target.tie_source
    for index, adapter in enumerate(adapters):
        edits = plan_adapter(adapter, index, target)
        edits.sort(key=lambda e: (e.tensor, e.phase))
        for edit in edits:
            plan.add(edit)
            if source is not None and target.is_head(edit.tensor):
                plan.tied_head = edit.tensor
        if source is not None:
            mirrored = [e for e in edits if e.tensor == source and isinstance(e, TokenRows)]
            if mirrored:
                head = plan.tied_head or "lm_head.weight"
                plan.tied_head = head
                for edit in mirrored:
                    plan.add(edit, head)
    if source is not None and plan.tied_head is None and plan.for_tensor(source):
        plan.tied_head = "lm_head.weight"
    return plan


def is_replacement(edit: Edit) -> bool:
    """Whether an edit replaces values (copies, token rows) rather than adding a delta."""
    return isinstance(edit, (Copy, TokenRows))
