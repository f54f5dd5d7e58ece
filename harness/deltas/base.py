"""What every adapter type provides to the oracle and the merger: :class:`Edit` objects.

An :class:`Edit` is one adapter's change to one tensor of the base model (one LoRA module, one
``modules_to_save`` copy, one set of trainable token rows). It offers two computations:

* :meth:`Edit.reference`: the exact reference value in a wide dtype (fp32 for half-precision
  checkpoints, fp64 for fp32 ones) together with a rigorous bound on how far any correct
  implementation's pre-rounding value may lie from it (the *slack*);
* :meth:`Edit.merge`: peft's own rounding path in the stored dtype, so the streaming merger is bit
  for bit what ``merge_and_unload`` + ``save_pretrained`` writes.

Edits are planned from headers and the adapter config only (no transformers model class), so the
oracle works for any architecture whose weights are safetensors.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from harness.architectures import INPUT_EMBEDDINGS, OUTPUT_HEADS, find_suffix, is_head
from harness.deltas.layouts import StoredLayout
from harness.errors import AdapterError
from harness.io.safetensors import TensorInfo
from harness.ulp import compute_dtype

if TYPE_CHECKING:
    import torch

    from harness.io.adapter import Adapter

#: Rows of a stored tensor an edit is evaluated on: a contiguous block, or row numbers.
Rows: TypeAlias = "slice | torch.Tensor"

@dataclass(frozen=True)
class Target:
    """What planning knows about the base checkpoint: its tensor headers and its config."""

    tensors: Mapping[str, TensorInfo]
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        """``config.json``'s ``model_type`` (empty when unknown)."""
        return str(self.config.get("model_type") or "")

    @property
    def tie_source(self) -> str | None:
        """The input embedding tensor when the base ties its output head to it, else None."""
        if not self.config.get("tie_word_embeddings", True):
            return None
        if find_suffix(self.tensors, OUTPUT_HEADS) is not None:
            return None
        return find_suffix(self.tensors, INPUT_EMBEDDINGS)

    @cached_property
    def layout(self) -> StoredLayout:
        """Where transformers 5 parameters are stored (renamed, fused or per expert)."""
        return StoredLayout(self.tensors, self.model_type)

    def is_head(self, logical: str) -> bool:
        """Whether ``logical`` names an output head (``lm_head.weight`` and kin)."""
        return is_head(logical)

    def resolve(self, logical: str, module: str) -> str:
        """The base tensor that holds ``logical`` (``<module>.weight``); AdapterError if none.

        Exact names first; a tied output head resolves to the input embedding it shares; then a
        unique suffix match either way round (checkpoints saved with or without a wrapper prefix
        such as ``transformer.`` or ``model.``).
        """
        if logical in self.tensors:
            return logical
        source = self.tie_source
        if source is not None and self.is_head(logical):
            return source
        renamed = self.layout.stored_name(logical)
        if renamed is not None:
            return renamed
        hits = sorted(
            n for n in self.tensors if n.endswith("." + logical) or logical.endswith("." + n)
        )
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise AdapterError(
                f"adapter module {module!r} is ambiguous in the base checkpoint: {hits[:3]}"
            )
        raise AdapterError(
            f"adapter module {module!r} matches no tensor of the base checkpoint (no"
            f" {logical!r}): was the adapter trained on another architecture?"
        )


@dataclass
class Step:
    """One edit applied to a block of rows: the reference value and its pre-rounding bound.

    ``bound`` bounds ``|X - value|`` elementwise, where ``X`` is the value a correct merge computes
    before rounding to the stored dtype; it already includes the error carried in from earlier
    edits of the same tensor (``incoming``).
    """

    value: torch.Tensor
    bound: torch.Tensor


class Edit(abc.ABC):
    """One adapter's change to one base tensor."""

    #: Short name of the change, used in reports (``lora``, ``dora``, ``copy``, ...).
    kind: ClassVar[str] = "edit"
    #: Order among one adapter's edits of the same tensor: copies load before deltas apply.
    phase: ClassVar[int] = 2
    #: Whether :meth:`reference` works on row blocks (False: it needs the whole tensor).
    blockable: ClassVar[bool] = True
    #: Whether the change is additive (``R = W + delta``); scale-fault diagnosis needs it.
    additive: ClassVar[bool] = False
    #: Whether the delta is stored transposed against ``B @ A`` (Conv1D, embeddings).
    transposed: bool = False
    #: The scale the delta is multiplied by (None where the type has no scalar scale).
    scale: float | None = None
    #: The rank of the update (None where the type has no rank).
    rank: int | None = None

    def __init__(
        self, adapter: Adapter, module: str, tensor: str, base: str, info: TensorInfo, index: int
    ) -> None:
        self.adapter = adapter
        #: Module path in the model namespace (``model.layers.0.self_attn.q_proj``).
        self.module = module
        #: Logical tensor name (``<module>.weight``; a tied head keeps its own name).
        self.tensor = tensor
        #: Base tensor that holds the original value (differs for a tied output head).
        self.base = base
        #: Header of that base tensor (shape and stored dtype).
        self.info = info
        #: Position of the adapter in a sequence of merged adapters.
        self.index = index
        self._cache: dict[tuple[str, Any], torch.Tensor] = {}

    # ---- adapter tensors ---------------------------------------------------------------

    def load(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """An adapter tensor converted to ``dtype`` (cached until :meth:`release`)."""
        cached = self._cache.get((key, dtype))
        if cached is None:
            cached = self.adapter.tensor(key).to(dtype)
            self._cache[(key, dtype)] = cached
        return cached

    def release(self) -> None:
        """Drop cached adapter tensors (the oracle calls it after each base tensor)."""
        self._cache.clear()

    # ---- the two computations ------------------------------------------------------------

    @abc.abstractmethod
    def reference(
        self, w: torch.Tensor, incoming: torch.Tensor | None, rows: Rows, code: str
    ) -> Step:
        """The exact value after this edit for stored rows ``rows`` of the current value ``w``.

        ``w`` is the reference so far (compute dtype), ``incoming`` the bound on how far the merge
        may already be from it (None: exact), ``code`` the stored dtype. ``rows`` is a slice or a
        tensor of row numbers.
        """

    def value(self, w: torch.Tensor, rows: Rows, code: str) -> torch.Tensor:
        """Only the reference value (no bound), in the compute dtype: the oracle's fast path.

        ``w`` may still be in the stored dtype (the first edit of a tensor gets the stored block,
        saving a conversion pass). Must equal ``reference(w', None, rows, code).value`` exactly,
        ``w'`` being ``w`` in the compute dtype.
        """
        return self.reference(w.to(compute_dtype(code)), None, rows, code).value

    @abc.abstractmethod
    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """Peft's merge of this edit into ``w`` (the whole tensor, stored dtype): a new tensor."""

    def describe(self) -> str:
        """One short phrase: what this edit does (``LoRA r=8 scale=2``)."""
        return self.kind

    def alternatives(self) -> list[tuple[str, float]]:
        """Named wrong scale factors a faulty merger might have used (additive edits only)."""
        return []

    def rounded(self, code: str) -> Edit | None:
        """The edit as peft computes it with its factors held in the stored dtype ``code``.

        None: the type has no such documented path.
        """
        return None

    def without_variant(self) -> Edit | None:
        """The edit a merger that ignores the variant computes (DoRA -> LoRA), or None."""
        return None

    def check(self) -> None:  # noqa: B027 - optional hook
        """Validate shapes against the base tensor; raise AdapterError naming the module."""

    def rows_needed(self) -> int:
        """Rows the tensor must have for this edit (more than the base's: a grown vocabulary)."""
        return self.info.shape[0] if self.info.shape else 0


def row_positions(rows: Rows, count: int) -> dict[int, int]:
    """Stored row number -> position in the block, for a slice or a tensor of row numbers."""
    if isinstance(rows, slice):
        start, stop, step = rows.indices(count)
        return {row: i for i, row in enumerate(range(start, stop, step))}
    return {int(row): i for i, row in enumerate(rows.tolist())}


def oriented_rows(
    left: torch.Tensor, right: torch.Tensor, rows: Rows, transposed: bool
) -> torch.Tensor:
    """Rows ``rows`` of ``left @ right`` (or of its transpose when ``transposed``).

    ``(out, r) @ (r, in) -> (out, in)``; transposed, rows of ``(in, out)`` are
    ``right[:, rows].T @ left.T``.
    """
    if transposed:
        # (rows, r) @ (r, out) -> (rows, out)
        return right[:, rows].T @ left.T
    # (rows, r) @ (r, in) -> (rows, in)
    return left[rows] @ right


def outer_norms(
    left: torch.Tensor, right: torch.Tensor, rows: Rows, transposed: bool
) -> torch.Tensor:
    """Cauchy-Schwarz bound ``||left_i|| * ||right_j||`` of ``sum_k |left_ik| |right_kj|``."""
    import torch

    left_norms = torch.linalg.vector_norm(left, dim=1)  # (out,)
    right_norms = torch.linalg.vector_norm(right, dim=0)  # (in,)
    if transposed:
        bound: torch.Tensor = right_norms[rows, None] * left_norms[None, :]
    else:
        bound = left_norms[rows, None] * right_norms[None, :]
    return bound
