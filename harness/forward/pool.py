"""The memory budget of forward passes, shared by every streamed model of a run.

What counts against the budget: each live model's resident tensors (the adapter's weights),
the layers materialised now (the one running and the one read ahead), the layers kept between
passes (the cache), and a reserve for activations. A model is admitted only when its largest
unit fits beside the resident tensors and the reserve; otherwise it is refused with the figures
(:class:`MemoryRefusal`). Layers are kept after a pass while room remains beyond the working
set (the largest unit twice: one running, one read ahead into the memory of the unit released
before, ``forward.buffers``), first come first kept: a
sequential pass over more layers than fit would evict every kept layer before reuse, so keeping
a fixed share is what saves reads. A unit is read ahead only while the budget has room for it.
The default budget grows only to a model's *floor* (one unit beside the resident tensors and the
reserve) when that exceeds the fixed default (``harness.memory.default_budget``): a model whose
layers are large runs without read-ahead rather than holding two of them, which keeps the
memory of the default suite nearly the same whatever the model size (a unit is read in well
under a tenth of the time it computes at that size).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError
from harness.forward.buffers import Recycler
from harness.memory import default_budget, format_size, suggest_size


class MemoryRefusal(HarnessError):
    """A single unit does not fit the memory budget (a skip with figures, not a failure)."""


@dataclass
class _Member:
    label: str
    resident: int
    largest: int
    largest_name: str
    cache: bool


@dataclass
class Pool:
    """The budget, the live models and the layers kept for them."""

    device: str = "cpu"
    #: ``--merge-memory`` (None: derived from the available memory, see :meth:`budget`).
    requested: int | None = None
    #: Bytes held back for activations of the largest pass planned.
    reserve: int = 0
    members: dict[int, _Member] = field(default_factory=dict)
    #: (member, unit name) -> (tensors, bytes), oldest first.
    cache: OrderedDict[tuple[int, str], tuple[dict[str, Any], int]] = field(
        default_factory=OrderedDict
    )
    #: Bytes of units materialised now and not kept (running or read ahead).
    live: int = 0
    #: Memory of released units, read into again by the next unit of the same shapes.
    recycler: Recycler = field(default_factory=lambda: Recycler(0))
    _derived: int = 0

    # ---- the budget ---------------------------------------------------------------------

    def floor(self) -> int:
        """Resident tensors, the reserve, and the largest unit once: the least a pass needs."""
        return self.resident + self.reserve + self.largest

    def working_set(self) -> int:
        """Resident tensors, the reserve, and room for the largest unit twice.

        Twice: one running and one read ahead. The memory of a released unit is kept for reuse
        (``forward.buffers``) and taken by the next read-ahead, so in a pass over layers of one
        size the two never hold more than two units between them.
        """
        return self.resident + self.reserve + 2 * self.largest

    @property
    def largest(self) -> int:
        """Bytes of the largest unit of any live model."""
        return max((m.largest for m in self.members.values()), default=0)

    @property
    def resident(self) -> int:
        """Bytes of every live model's resident tensors."""
        return sum(m.resident for m in self.members.values())

    @property
    def cached(self) -> int:
        """Bytes of the layers kept between passes."""
        return sum(nbytes for _, nbytes in self.cache.values())

    @property
    def budget(self) -> int:
        """The budget in bytes: ``--merge-memory``, else derived once, grown to the floor."""
        if self.requested is not None:
            return self.requested
        if self._derived < self.floor():
            self._derived = max(self._derived, default_budget(self.device, self.floor()))
        return self._derived

    @property
    def used(self) -> int:
        """Bytes counted against the budget now."""
        return self.resident + self.reserve + self.cached + self.live

    def describe(self) -> str:
        """One line: budget, resident, kept and working bytes."""
        source = "--merge-memory" if self.requested is not None else "default"
        return (
            f"memory budget {format_size(self.budget)} ({source}): resident"
            f" {format_size(self.resident)}, kept layers {format_size(self.cached)}, activations"
            f" reserve {format_size(self.reserve)}"
        )

    # ---- members ------------------------------------------------------------------------

    def admit(
        self, owner: Any, label: str, resident: int, units: list[tuple[str, int]], cache: bool
    ) -> None:
        """Count a model in; MemoryRefusal when its largest unit cannot fit beside the rest."""
        name, largest = max(units, key=lambda u: u[1], default=("", 0))
        member = _Member(label, resident, largest, name, cache)
        self.members[id(owner)] = member
        floor = self.resident + self.reserve + largest
        if floor > self.budget:
            del self.members[id(owner)]
            self.limit_recycler()
            raise MemoryRefusal(
                f"{label}: one unit ({name or 'the model'}) needs {format_size(largest)}, beside"
                f" {format_size(self.resident + resident)} of resident adapter weights and a"
                f" {format_size(self.reserve)} activation reserve: {format_size(floor)} >"
                f" {format_size(self.budget)} memory budget"
                + (
                    " (--merge-memory)"
                    if self.requested is not None
                    else " (3/4 of the available memory)"
                )
                + f"; pass --merge-memory {suggest_size(floor * 1.1)} or more"
            )
        self.limit_recycler()
        self.trim()

    def leave(self, owner: Any) -> None:
        """Forget a model and the layers kept for it."""
        self.members.pop(id(owner), None)
        for key in [k for k in self.cache if k[0] == id(owner)]:
            del self.cache[key]
        if not self.members:
            self.recycler.clear()
        self.limit_recycler()

    def limit_recycler(self) -> None:
        """Keep released units' memory for reuse only within the budget.

        The recycled memory of one unit is what the next unit of the same shapes is read into:
        the working set's second unit. Where the budget holds only the floor (one unit), memory
        kept for reuse would come on top of it, so only what the budget leaves beyond the floor
        is kept (the rest is freed, and the next unit allocates afresh).
        """
        self.recycler.resize(max(0, min(self.largest, self.budget - self.floor())))

    def set_reserve(self, nbytes: int) -> None:
        """Hold ``nbytes`` back for activations (the largest pass planned), dropping kept layers."""
        self.reserve = max(nbytes, 0)
        self.limit_recycler()
        self.trim()

    @contextmanager
    def focus(self, owner: Any) -> Iterator[None]:
        """While one model runs many passes in a row (greedy decoding), let it keep its layers.

        Layers kept for the other models are dropped: they would sit unused while this model
        reads its own layers again on every pass. The activation reserve stays as it is (the
        memory activations used before is not reliably given back to the system, so using that
        room for layers would grow the process instead). Other models keep layers again as
        they read them after.
        """
        for key in [k for k in self.cache if k[0] != id(owner)]:
            del self.cache[key]
        yield

    def trim(self) -> None:
        """Drop kept layers, oldest first, until the working set fits beside them."""
        while self.cache and self.cached + self.working_set() + self.live > self.budget:
            self.cache.popitem(last=False)

    # ---- units --------------------------------------------------------------------------

    def kept(self, owner: Any, unit: str) -> dict[str, Any] | None:
        """The kept tensors of ``unit``, or None."""
        found = self.cache.get((id(owner), unit))
        if found is None:
            return None
        self.cache.move_to_end((id(owner), unit))
        return found[0]

    def take(self, nbytes: int) -> bool:
        """Count ``nbytes`` as materialised now if they fit (dropping kept layers if needed)."""
        while self.used + nbytes > self.budget and self.cache:
            self.cache.popitem(last=False)
        if self.used + nbytes > self.budget:
            return False
        self.live += nbytes
        return True

    def force(self, nbytes: int) -> None:
        """Count ``nbytes`` as materialised now whether or not they fit (the running unit)."""
        while self.used + nbytes > self.budget and self.cache:
            self.cache.popitem(last=False)
        self.live += nbytes

    def can_read_ahead(self, nbytes: int) -> bool:
        """Whether a unit of ``nbytes`` may be read ahead beside what is materialised now."""
        return self.resident + self.reserve + self.live + nbytes <= self.budget

    def give(self, owner: Any, unit: str, tensors: dict[str, Any], nbytes: int) -> bool:
        """Release a materialised unit: keep it for the next pass when room remains (True)."""
        self.live -= nbytes
        member = self.members.get(id(owner))
        room = self.budget - self.working_set() - self.cached - self.live
        if member is not None and member.cache and nbytes <= room:
            self.cache[(id(owner), unit)] = (tensors, nbytes)
            return True
        return False


def activation_bytes(config: Any, rows: int, length: int, itemsize: int = 4) -> int:
    """A generous estimate of the activations of one forward pass of ``rows`` x ``length`` tokens.

    Per token: the residual stream and about seven more hidden-sized tensors (norms, q/k/v,
    attention output), three intermediate-sized ones (the gated MLP), and the output logits
    three times (the model's, the copy taken of the real positions, and another model's outputs
    kept for the comparison); per row the attention scores of one layer. ``config`` is a
    transformers config or a ``config.json`` dict (its text config is used).
    """
    if isinstance(config, dict):
        text: Any = (
            config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        )
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def number(*names: str, default: int = 0) -> int:
        for name in names:
            value = text.get(name) if isinstance(text, dict) else getattr(text, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return default

    hidden = number("hidden_size", "d_model", "n_embd", default=1024)
    inter = number("intermediate_size", "d_ff", "n_inner", "ffn_dim", default=4 * hidden)
    vocab = number("vocab_size", default=32000)
    heads = number("num_attention_heads", "num_heads", "n_head", "encoder_attention_heads")
    tokens = rows * length
    per_token = 8 * hidden + 3 * inter + 3 * vocab
    scores = rows * max(heads, 1) * length * length
    return (tokens * per_token + scores) * itemsize
