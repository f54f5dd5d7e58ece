"""Reading stored tensors into reused memory: no fresh allocation per layer and pass.

A streamed model reads the same layer shapes over and over. Fresh buffers of tens or hundreds
of MB are mapped by the C library one by one and zero-filled page by page by the kernel on
first touch (at 1.1B, more system time than the forward passes' arithmetic), so the tensors of
a released unit are kept in a :class:`Recycler` and the next unit of the same shapes is read
straight into them: bytes land in place (``read_into``), and a cast to the compute dtype goes
through one reused staging tensor per shape.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from harness.io.checkpoint import Checkpoint
from harness.io.safetensors import read_range

if TYPE_CHECKING:
    import torch


def read_into(checkpoint: Checkpoint, name: str, target: torch.Tensor) -> None:
    """Read stored tensor ``name`` into ``target`` (CPU, its stored dtype and shape), in place."""
    if checkpoint.is_pickle:
        target.copy_(checkpoint.tensor(name))
        return
    import torch

    # (numel,) -> (nbytes,) uint8 view of the same memory, for the file reads to land in
    raw: Any = target.reshape(-1).view(torch.uint8).numpy()
    read_range(checkpoint.tensors[name], raw)


class Recycler:
    """Idle tensors of released units, by shape, dtype and device, up to ``limit`` bytes.

    Over the limit the longest idle go first: the next unit to read is most like the one
    released last (the layers of a model share their shapes; an embedding's do not).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._free: OrderedDict[int, tuple[tuple[Any, ...], torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> torch.Tensor:
        """A tensor of that shape, dtype and device: an idle one, else a new one."""
        import torch

        key = (tuple(shape), dtype, str(device))
        with self._lock:
            for ident, (held_key, tensor) in reversed(self._free.items()):
                if held_key == key:
                    del self._free[ident]
                    self.held -= tensor.numel() * tensor.element_size()
                    return tensor
        with torch.inference_mode(False):
            return torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` for reuse, dropping the longest idle beyond the limit.

        Tensors made in inference mode cannot be written outside it: they are left to be freed.
        """
        if tensor.is_inference() or not tensor.is_contiguous():
            return
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.limit:
            return
        key = (tuple(tensor.shape), tensor.dtype, str(tensor.device))
        with self._lock:
            self._free[id(tensor)] = (key, tensor)
            self.held += nbytes
            while self.held > self.limit:
                _, (_, old) = self._free.popitem(last=False)
                self.held -= old.numel() * old.element_size()

    def resize(self, limit: int) -> None:
        """Set the limit, dropping the longest idle tensors beyond it now."""
        with self._lock:
            self.limit = limit
            while self.held > self.limit and self._free:
                _, (_, old) = self._free.popitem(last=False)
                self.held -= old.numel() * old.element_size()

    def clear(self) -> None:
        """Drop every idle tensor."""
        with self._lock:
            self._free.clear()
            self.held = 0
