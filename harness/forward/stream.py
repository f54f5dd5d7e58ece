"""Streamed models: each unit's weights read from the checkpoint just before it runs.

A :class:`StreamedModel` is a skeleton (``forward.skeleton``) with an accelerate hook on every
unit (``forward.units``): before the unit's module runs, its weights are read from the original
safetensors files with the harness's own reader (plain reads into fresh buffers, no memory map,
so nothing of the checkpoint stays mapped into the process), made by the weight plan's recipe,
cast to the parameter's dtype and placed on the device; after it returns they are dropped, or
kept for the next pass while the budget has room (``forward.pool``). While one unit runs, the
next is read on a background thread. Calling the model is calling the transformers (or peft)
model: the architecture's own code runs, unchanged. Nothing is written anywhere.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.dtypes import to_torch
from harness.errors import HarnessError
from harness.forward.buffers import read_into
from harness.forward.plan import WeightPlan, convert, read_tensor
from harness.forward.pool import Pool
from harness.forward.skeleton import Slot
from harness.forward.units import Unit, partition
from harness.io.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

#: What runs after a unit is freshly materialised and placed (the twin's merge, per layer).
Transform = Callable[[Unit], None]


@dataclass
class _Entered:
    parameters: list[Any]
    nbytes: int
    fresh: bool
    count: int = 1


@dataclass
class Traffic:
    """What a streamed model has read: forward passes and checkpoint bytes."""

    passes: int = 0
    bytes_read: int = 0
    units_read: int = 0
    units_kept: int = 0
    #: Units that were read while the one before them ran.
    units_ahead: int = 0
    #: Units read ahead that the pass did not run next after all (the first pass learns the
    #: order in which the model calls its units).
    units_dropped: int = 0


class StreamedModel:
    """A model whose layers are read from its checkpoint while it runs, within a memory budget.

    ``model`` is the module to call (a transformers model, or a ``PeftModel`` around one);
    ``plain`` the transformers model whose parameter names the ``plan`` uses; ``owned`` its
    meta weights (``skeleton.slots``), still owned by the same modules inside ``model``.
    """

    def __init__(
        self,
        model: Any,
        plain: Any,
        owned: list[Slot],
        plan: WeightPlan,
        checkpoint: Checkpoint,
        *,
        device: str,
        pool: Pool,
        label: str,
        keep: bool = True,
        transform: Transform | None = None,
    ) -> None:
        import torch

        self.model = model
        self.plain = plain
        self.plan = plan
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.pool = pool
        self.label = label
        self.transform = transform
        self.traffic = Traffic()
        self.owned = owned
        self.units = partition(model, owned)
        self._place()
        self._load_buffers()
        resident = sum(
            p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta"
        )
        #: Parameters of the whole model, counted from the shapes (the small-model rule).
        self.numel = sum(p.numel() for p in model.parameters())
        pool.admit(self, label, resident, [(u.name, u.nbytes) for u in self.units], keep)
        self._entered: dict[str, _Entered] = {}
        self._ahead: dict[str, tuple[concurrent.futures.Future[list[Any]], int]] = {}
        self._order = [u.name for u in self.units]
        self._by_name = {u.name: u for u in self.units}
        self._seen: list[str] = []
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="merge-harness-read-ahead"
        )
        self._hooks: list[Any] = []
        self._attach()

    # ---- running ------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One forward pass of the model (its weights read unit by unit)."""
        return self.invoke(self.model, *args, **kwargs)

    def invoke(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``function`` (the model, or a part such as its encoder) as one pass."""
        self.traffic.passes += 1
        self._seen = []
        try:
            return function(*args, **kwargs)
        finally:
            self._settle()

    def release(self) -> None:
        """Drop every materialised and kept unit, the hooks, and the model's place in the pool."""
        self._settle()
        from accelerate.hooks import remove_hook_from_module

        for unit in self.units:
            remove_hook_from_module(unit.module)
        self._reader.shutdown(wait=True, cancel_futures=True)
        self.pool.leave(self)

    # ---- hooks --------------------------------------------------------------------------

    def _attach(self) -> None:
        from accelerate.hooks import ModelHook, add_hook_to_module

        streamed = self

        class UnitHook(ModelHook):  # type: ignore[misc]
            """Materialise a unit before its module runs, release it after."""

            def __init__(self, unit: Unit) -> None:
                self.unit = unit

            def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
                streamed._enter(self.unit)
                return args, kwargs

            def post_forward(self, module: Any, output: Any) -> Any:
                streamed._leave(self.unit)
                return output

        for unit in self.units:
            add_hook_to_module(unit.module, UnitHook(unit))

    def _enter(self, unit: Unit) -> None:
        state = self._entered.get(unit.name)
        if state is not None:
            state.count += 1
            return
        self._seen.append(unit.name)
        kept = self.pool.kept(self, unit.name)
        fresh = kept is None
        if kept is not None:
            parameters = kept["parameters"]
            self.traffic.units_kept += 1
        else:
            ahead = self._ahead.pop(unit.name, None)
            if ahead is None:
                self.pool.force(unit.nbytes)
            try:
                parameters = ahead[0].result() if ahead is not None else self._materialise(unit)
            except BaseException:
                self.pool.live -= unit.nbytes
                raise
            if ahead is not None:
                self.traffic.units_ahead += 1
        self._entered[unit.name] = _Entered(parameters, unit.nbytes, fresh)
        for slot, parameter in zip(unit.slots, parameters, strict=True):
            slot.module._parameters[slot.attr] = parameter
        if fresh and self.transform is not None:
            self.transform(unit)
        self._read_ahead(unit)

    def _leave(self, unit: Unit) -> None:
        state = self._entered.get(unit.name)
        if state is None:
            return
        state.count -= 1
        if state.count > 0:
            return
        del self._entered[unit.name]
        for slot in unit.slots:
            slot.module._parameters[slot.attr] = slot.meta
        if state.fresh and not self.pool.give(
            self, unit.name, {"parameters": state.parameters}, state.nbytes
        ):
            # dropped: its memory is read into again by the next unit of the same shapes
            for tensor in {id(p.data): p.data for p in state.parameters}.values():
                self.pool.recycler.give(tensor)

    def _settle(self) -> None:
        """After a pass (or an error inside one): release what is still materialised."""
        for name in list(self._entered):
            self._entered[name].count = 1
            self._leave(self._by_name[name])
        for future, nbytes in self._ahead.values():
            self.traffic.units_dropped += 1
            future.cancel()
            # a read-ahead that failed or was cancelled is simply dropped
            with contextlib.suppress(Exception):
                future.result()
            self.pool.live -= nbytes
        self._ahead.clear()
        if self._seen:
            order = list(dict.fromkeys(self._seen))
            self._order = order + [n for n in self._order if n not in set(order)]

    def _read_ahead(self, unit: Unit) -> None:
        """Start reading the unit the last pass ran after ``unit``, if the budget allows."""
        try:
            following = self._order[self._order.index(unit.name) + 1]
        except (ValueError, IndexError):
            return
        target = self._by_name[following]
        if (
            following in self._entered
            or following in self._ahead
            or self.pool.kept(self, following) is not None
            or not self.pool.can_read_ahead(target.nbytes)
        ):
            return
        self.pool.live += target.nbytes
        self._ahead[following] = (
            self._reader.submit(self._materialise, target),
            target.nbytes,
        )

    # ---- materialising ------------------------------------------------------------------

    def _materialise(self, unit: Unit) -> list[Any]:
        """The unit's weights as parameters on the device, in their dtypes (thread-safe)."""
        import torch

        made: dict[str, torch.Tensor] = {}
        read: dict[str, torch.Tensor] = {}
        out: list[Any] = []
        for slot in unit.slots:
            tensor = self._make(slot, made, read)
            if tuple(tensor.shape) != tuple(slot.meta.shape):
                raise HarnessError(
                    f"{self.checkpoint.root}: {slot.name} is stored with shape"
                    f" {list(tensor.shape)} but {type(self.plain).__name__} needs"
                    f" {list(slot.meta.shape)}"
                )
            out.append(torch.nn.Parameter(tensor, requires_grad=False))
        self.traffic.units_read += 1
        return out

    def _make(
        self, slot: Slot, made: dict[str, torch.Tensor], read: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        import torch

        recipe = self.plan.recipes.get(slot.name)
        if recipe is None:
            # a weight the checkpoint lacks (``loads`` reports it; transformers would initialise
            # it randomly): zeros, so that the comparisons stay deterministic
            return torch.zeros(slot.meta.shape, dtype=slot.meta.dtype, device=self.device)
        if recipe.converter is None:
            source = recipe.sources[0]
            if source not in read:
                read[source] = self._read(source, slot.meta.dtype)
                self.traffic.bytes_read += self.checkpoint.tensors[source].nbytes
            stored = read[source]
        else:
            if slot.name not in made:
                made.update(convert(recipe, self.plain, self.checkpoint))
                self.traffic.bytes_read += sum(
                    self.checkpoint.tensors[s].nbytes for s in recipe.sources
                )
            stored = made[slot.name]
        return stored.to(device=self.device, dtype=slot.meta.dtype)

    def _read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Stored tensor ``name`` in ``dtype`` on the device, in recycled memory."""
        import torch

        info = self.checkpoint.tensors[name]
        stored = to_torch(info.dtype)
        recycler = self.pool.recycler
        with torch.inference_mode(False), torch.no_grad():
            if stored == dtype and self.device.type == "cpu":
                target = recycler.take(info.shape, dtype, self.device)
                read_into(self.checkpoint, name, target)
                return target
            staging = recycler.take(info.shape, stored, "cpu")
            read_into(self.checkpoint, name, staging)
            target = recycler.take(info.shape, dtype, self.device)
            target.copy_(staging)
            recycler.give(staging)
            return target

    def _place(self) -> None:
        """Resident parameters and buffers on the device (the skeleton made them on the CPU)."""
        for module in self.model.modules():
            for table in (module._parameters, module._buffers):
                for name, value in table.items():
                    if (
                        value is not None
                        and value.device.type != "meta"
                        and value.device != self.device
                    ):
                        moved = value.to(self.device)
                        table[name] = (
                            type(value)(moved, requires_grad=False)
                            if table is module._parameters
                            else moved
                        )

    def _load_buffers(self) -> None:
        """Persistent buffers the checkpoint stores, loaded once (transformers loads them too)."""
        for name, source in self.plan.buffers.items():
            try:
                buffer = self.plain.get_buffer(name)
            except AttributeError:
                continue
            value = read_tensor(self.checkpoint, source)
            if tuple(value.shape) == tuple(buffer.shape):
                buffer.copy_(value.to(dtype=buffer.dtype, device=buffer.device))
