"""Where a transformers-5 parameter is stored: fused in one tensor, renamed, or split per expert.

transformers 5 loads most decoder MoE checkpoints through a *conversion mapping*: the per-expert
weights ``mlp.experts.<e>.gate_proj.weight`` and ``...up_proj.weight`` are stacked over the
experts and concatenated into one parameter ``mlp.experts.gate_up_proj`` of shape
``(experts, 2 * intermediate, hidden)``, and some modules are renamed (Mixtral's
``block_sparse_moe`` becomes ``mlp``). A PEFT adapter trained on transformers 5 names these
parameters; a checkpoint keeps whichever layout the program that saved it wrote (transformers 4,
and transformers 5 by default, write the per-expert layout back; models such as gpt-oss are
stored fused). :class:`StoredLayout` applies transformers' own mapping (its ``WeightRenaming``
and ``WeightConverter`` objects, read with transformers' ``rename_source_key``) to the stored
names, so every piece of a parameter is found where it is, in either layout.

Only the conversions MoE models use are interpreted: stacking over the experts
(``MergeModulelist(dim=0)``) and concatenation of parts along the expert's first dimension
(``Concatenate(dim=1)``). A parameter built by any other operation is reported as not
verifiable, by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.errors import UnsupportedAdapterError
from harness.io.safetensors import TensorInfo


@dataclass(frozen=True)
class Piece:
    """One stored tensor holding (part of) a parameter.

    ``expert`` is None when the stored tensor holds every expert (the fused layout, experts along
    dimension 0, or a parameter without experts); ``rows`` is the slice of the expert's first
    dimension the stored tensor holds (the whole of it unless fused parts were stored apart).
    """

    stored: str
    expert: int | None = None
    rows: slice = field(default_factory=lambda: slice(None))


@dataclass
class _Converted:
    """Stored tensors a converter turns into one parameter, with their expert and part."""

    operations: list[Any]
    sources: list[tuple[str, int, int]] = field(default_factory=list)  # (stored, expert, part)


def conversion_mapping(model_type: str) -> list[Any]:
    """The checkpoint conversion mapping of transformers for ``model_type`` (empty if none).

    transformers looks a model type up through an alias table first (``qwen3_moe`` uses the
    ``qwen2_moe`` mapping); peft does the same when it converts adapters.
    """
    if not model_type:
        return []
    try:
        from transformers.conversion_mapping import (
            _MODEL_TO_CONVERSION_PATTERN,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers 4 installation: checkpoints are what it loads
        return []
    key = _MODEL_TO_CONVERSION_PATTERN.get(model_type, model_type)
    mapping = get_checkpoint_conversion_mapping(key)  # type: ignore[no-untyped-call]
    return list(mapping or [])


def _expert_number(pattern: str, key: str) -> int | None:
    """The number the ``*`` of a converter's source pattern stands for in ``key``."""
    parts = [re.escape(p) for p in pattern.split("*")]
    match = re.search(r"(\d+)".join(parts), key)
    return int(match.group(1)) if match and len(parts) == 2 else None


class StoredLayout:
    """Stored tensor names mapped onto the parameter names of the transformers 5 model."""

    def __init__(self, tensors: Mapping[str, TensorInfo], model_type: str) -> None:
        self.tensors = tensors
        self.model_type = model_type
        #: transformers 5 parameter name -> the one stored tensor that is it, renamed.
        self.renamed: dict[str, str] = {}
        #: transformers 5 parameter name -> the stored tensors a converter combines into it.
        self.converted: dict[str, _Converted] = {}
        mapping = conversion_mapping(model_type)
        if not mapping:
            return
        from transformers.core_model_loading import (
            WeightConverter,
            apply_converters,
            apply_renamings,
        )

        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
        for name in sorted(tensors):
            renamed = apply_renamings(name, renamings)
            target, pattern = apply_converters(renamed, converters)
            if pattern is None:
                if renamed != name:
                    self.renamed.setdefault(renamed, name)
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            expert = _expert_number(pattern, renamed)
            entry = self.converted.setdefault(target, _Converted(list(converter.operations)))
            if expert is not None:
                entry.sources.append((name, expert, converter.source_patterns.index(pattern)))

    def stored_name(self, logical: str) -> str | None:
        """The stored tensor that is the parameter ``logical`` (renamed or not), if one is."""
        if logical in self.tensors:
            return logical
        return self.renamed.get(logical)

    def pieces(self, parameter: str) -> list[Piece]:
        """Where the parameter named ``parameter`` is stored; empty when it is nowhere.

        Raises :class:`UnsupportedAdapterError` for a parameter a conversion builds with
        operations other than stacking experts and concatenating parts.
        """
        stored = self.stored_name(parameter)
        if stored is not None:
            return [Piece(stored)]
        entry = self.converted.get(parameter)
        if entry is None or not entry.sources:
            return []
        names = [type(op).__name__ for op in entry.operations]
        dims = [getattr(op, "dim", None) for op in entry.operations]
        supported = names in (["MergeModulelist"], ["MergeModulelist", "Concatenate"])
        if not supported or dims[0] != 0 or (len(dims) == 2 and dims[1] != 1):
            raise UnsupportedAdapterError(
                f"parameter {parameter!r} is stored in a layout transformers builds with"
                f" {', '.join(names)}; merge-harness verifies stacked and concatenated experts"
                " only"
            )
        parts = max(part for _, _, part in entry.sources) + 1
        # each part's row count, from any expert's stored tensor of that part
        heights = [0] * parts
        for name, _, part in entry.sources:
            heights[part] = self.tensors[name].shape[0]
        offsets = [sum(heights[:i]) for i in range(parts)]
        return [
            Piece(name, expert, slice(offsets[part], offsets[part] + heights[part]))
            for name, expert, part in sorted(entry.sources, key=lambda s: (s[1], s[2]))
        ]

    def shape(self, parameter: str) -> tuple[int, ...] | None:
        """The parameter's shape in the transformers 5 model, from its stored pieces."""
        pieces = self.pieces(parameter)
        if not pieces:
            return None
        if pieces[0].expert is None:
            return tuple(self.tensors[pieces[0].stored].shape)
        experts = max(p.expert for p in pieces if p.expert is not None) + 1
        rows = max(p.rows.stop for p in pieces)
        return (experts, rows, *self.tensors[pieces[0].stored].shape[1:])
