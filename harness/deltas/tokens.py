"""Replacements: ``modules_to_save`` copies, saved ``base_layer`` weights, trainable token rows.

peft saves a full copy of every ``modules_to_save`` module (and, for targeted embeddings, the
embedding's own ``base_layer.weight``); on load the copy replaces the base tensor, rounded to the
stored dtype. Trainable tokens (``trainable_token_indices``, or the ``TRAINABLE_TOKENS`` type)
save the new rows as ``trainable_tokens_delta`` — despite the name, values, not differences — and
merging writes them over the rows with ``index_copy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from harness.deltas.base import Edit, Rows, Step, Target, row_positions
from harness.errors import AdapterError

if TYPE_CHECKING:
    import torch

    from harness.io.adapter import Adapter


class Copy(Edit):
    """A saved tensor that replaces the base tensor outright."""

    kind: ClassVar[str] = "modules_to_save"
    phase: ClassVar[int] = 0

    def __init__(self, *args: Any, key: str, courtesy: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key
        #: True for an embedding's saved ``base_layer.weight`` (a copy of the base, usually).
        self.courtesy = courtesy

    def check(self) -> None:
        """The base tensor's shape, or more rows of it (a vocabulary grown before training)."""
        shape = tuple(self.adapter.tensors[self.key].shape)
        base = self.info.shape
        if shape != base and not (
            len(shape) == len(base) and len(shape) >= 1 and shape[1:] == base[1:]
            and shape[0] > base[0]
        ):
            raise AdapterError(
                f"adapter copy of {self.tensor!r} has shape {list(shape)} but the base tensor"
                f" {list(base)}"
            )

    def rows_needed(self) -> int:
        """The copy's rows (more than the base's when the vocabulary grew)."""
        shape = self.adapter.tensors[self.key].shape
        return int(shape[0]) if shape else 0

    def describe(self) -> str:
        """``modules_to_save copy`` or ``saved base_layer copy``."""
        return "saved base_layer copy" if self.courtesy else "modules_to_save copy"

    def reference(
        self, w: torch.Tensor, incoming: torch.Tensor | None, rows: Rows, code: str
    ) -> Step:
        """The saved copy itself: exact, so the only error left is the final rounding."""
        import torch

        value = self.load(self.key, w.dtype)[rows].clone()
        return Step(value, torch.zeros_like(value))

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """``param.copy_(saved)``: the copy rounded to the stored dtype."""
        w.copy_(self.adapter.tensor(self.key))
        return w


class TokenRows(Edit):
    """Trainable tokens: the saved rows replace the base rows at the given indices."""

    kind: ClassVar[str] = "trainable-tokens"
    phase: ClassVar[int] = 1

    def __init__(self, *args: Any, key: str, indices: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key
        self.indices = indices

    def check(self) -> None:
        """One saved row per index, no negative index (beyond the base: a grown vocabulary)."""
        shape = tuple(self.adapter.tensors[self.key].shape)
        _, *rest = self.info.shape
        if shape != (len(self.indices), *rest):
            raise AdapterError(
                f"adapter module {self.module!r}: trainable_tokens_delta has shape {list(shape)}"
                f" but {len(self.indices)} token indices over rows of {rest}"
            )
        bad = [i for i in self.indices if i < 0]
        if bad:
            raise AdapterError(f"adapter module {self.module!r}: negative token index {bad[0]}")

    def rows_needed(self) -> int:
        """One past the largest index."""
        return max(self.indices, default=-1) + 1

    def describe(self) -> str:
        """``trainable-tokens 3 rows``."""
        return f"{self.kind} {len(self.indices)} rows"

    def reference(
        self, w: torch.Tensor, incoming: torch.Tensor | None, rows: Rows, code: str
    ) -> Step:
        """The block with the trainable rows replaced; those rows become exact."""
        import torch

        where = row_positions(rows, self.info.shape[0])
        saved = self.load(self.key, w.dtype)
        value = w.clone()
        bound = torch.zeros_like(w) if incoming is None else incoming.clone()
        for position, index in enumerate(self.indices):
            if index in where:
                value[where[index]] = saved[position]
                bound[where[index]] = 0
        return Step(value, bound)

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """Peft's ``TrainableTokensLayer.merge``: ``index_copy`` of the rows cast to the weight."""
        import torch

        index = torch.tensor(self.indices)
        return w.index_copy(dim=0, index=index, source=self.adapter.tensor(self.key).to(w))


def _indices_for(spec: Any, module: str) -> list[int] | None:
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for name, value in spec.items():
            if module == name or module.endswith("." + str(name)):
                return [int(i) for i in value]
    return None


def token_rows(
    adapter: Adapter, index: int, target: Target, module: str, key: str, spec: Any
) -> list[Edit]:
    """The trainable-token edit of ``module``; ``spec`` is the config's indices (list or dict)."""
    indices = _indices_for(spec, module)
    if indices is None:
        raise AdapterError(
            f"adapter module {module!r}: trainable_tokens_delta saved but the config names no"
            " token indices for it"
        )
    tensor = module + ".weight"
    base = target.resolve(tensor, module)
    return [TokenRows(adapter, module, tensor, base, target.tensors[base], index, key=key,
                      indices=indices)]


def copies(adapter: Adapter, index: int, target: Target) -> list[Edit]:
    """Every full copy the adapter saves (``modules_to_save``, ``base_layer`` weights)."""
    edits: list[Edit] = []
    layout = adapter.layout
    for tensor, key in sorted(layout.copies.items()):
        module = tensor.rsplit(".", 1)[0]
        base = target.resolve(tensor, module)
        edits.append(Copy(adapter, module, tensor, base, target.tensors[base], index, key=key,
                          courtesy=tensor in layout.base_layer_copies))
    return edits


class TokensType:
    """The registry entry for ``peft_type == "TRAINABLE_TOKENS"``."""

    peft_type = "TRAINABLE_TOKENS"

    def plan(self, adapter: Adapter, index: int, target: Target) -> list[Edit]:
        """One row-replacement edit per module with saved token rows."""
        edits: list[Edit] = []
        for module, roles in sorted(adapter.layout.modules.items()):
            if set(roles) != {"trainable_tokens_delta"}:
                raise AdapterError(
                    f"adapter module {module!r}: unexpected tensors {sorted(roles)} in a"
                    " TRAINABLE_TOKENS adapter"
                )
            edits += token_rows(adapter, index, target, module, roles["trainable_tokens_delta"],
                                adapter.config.get("token_indices"))
        return edits
