"""The units a model is streamed in: its layers, and the modules outside them.

A *block* is one child of a ``ModuleList`` of layers (a decoder or encoder layer, with
everything inside it: attention, MLP or experts, norms, adapter layers): all its weights are
materialised when it is called and dropped after it returns, so code inside a layer may use any
of its weights directly. Weights outside the layers (embeddings, final norm, output head,
poolers, classifiers) are units of the module that owns them, or of the peft wrapper around
that module (a LoRA layer reads its base layer's weight directly for DoRA); with ``outer="root"``
they are one unit materialised for the whole forward pass instead, for models whose code uses
such a weight outside its module's call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from harness.forward.skeleton import Slot


@dataclass
class Unit:
    """Weights materialised together, when ``module`` is called."""

    name: str
    module: Any
    slots: list[Slot] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes the unit holds once materialised (its parameters' dtypes and shapes)."""
        return sum(s.meta.numel() * s.meta.element_size() for s in self.slots)


def _is_wrapper(module: Any) -> bool:
    """A peft layer or wrapper whose code reads its base layer's weights directly.

    A ``ModulesToSaveWrapper`` is not one: it calls the trained copy (resident) or the original
    module, which is then a unit of its own, materialised only if it ever runs.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError:
        return False
    if isinstance(module, ModulesToSaveWrapper):
        return False
    return isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))


def _has_meta(module: Any) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())


def _own_meta(module: Any) -> bool:
    return any(p is not None and p.device.type == "meta" for p in module._parameters.values())


def _walk(module: Any, path: str, outer: str) -> Iterator[tuple[str, Any, bool]]:
    """(path, module, whole subtree?) of each unit root, in registration order."""
    import torch

    if (
        isinstance(module, torch.nn.ModuleList)
        and len(module)
        and all(_has_meta(child) for child in module)
    ):
        for index, child in enumerate(module):
            yield f"{path}.{index}" if path else str(index), child, True
        return
    if outer == "modules" and _is_wrapper(module) and _has_meta(module):
        yield path, module, True
        return
    if outer == "modules" and _own_meta(module):
        yield path, module, False
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{path}.{name}" if path else name, outer)


def partition(model: Any, owned: list[Slot], outer: str = "modules") -> list[Unit]:
    """Split ``model``'s meta weights (``owned``, by owner module) into units.

    ``outer``: ``"modules"`` (each module outside the layers is its own unit) or ``"root"``
    (all of them one unit, hooked on ``model`` itself). Every slot lands in exactly one unit.
    """
    by_owner: dict[int, list[Slot]] = {}
    for slot in owned:
        by_owner.setdefault(id(slot.module), []).append(slot)
    units: list[Unit] = []
    claimed: set[int] = set()
    for path, root, whole in _walk(model, "", outer):
        modules = list(root.modules()) if whole else [root]
        unit = Unit(path, root)
        for module in modules:
            if id(module) in by_owner and id(module) not in claimed:
                claimed.add(id(module))
                unit.slots.extend(by_owner[id(module)])
        if unit.slots:
            units.append(unit)
    rest = [slot for key, group in by_owner.items() if key not in claimed for slot in group]
    if rest:
        units.append(Unit("", model, rest))
    return units
