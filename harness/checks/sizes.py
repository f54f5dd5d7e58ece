"""Refuse, before a byte is read, a merged tensor larger than the inputs justify."""

from __future__ import annotations

import contextlib

from harness.errors import CheckpointError
from harness.memory import GIB, shortfall
from harness.run.context import Context, Key

#: How much larger than the largest base or adapter tensor a merged tensor may be (a merge
#: never grows a tensor; a resized vocabulary grows the embedding by a few rows).
GROWTH = 2
SIZES: Key[int | None] = Key("pass:sizes")


def justified_sizes(ctx: Context) -> int | None:
    """Refuse, before a byte is read, a merged tensor larger than the inputs justify.

    A streamed pass holds whole tensors: a checkpoint that declares one of many GiB decides how
    much memory the run takes. Each merged tensor must be at most :data:`GROWTH` times the
    largest tensor of the base and the adapter (when a base is given), and must fit in the
    memory available now. Returns the bound (None without a base). Raises CheckpointError
    naming the file and the tensor.
    """

    def compute() -> int | None:
        merged = ctx.merged()
        limit = None
        if ctx.has_base:
            sizes = [t.nbytes for t in ctx.base().tensors.values()]
            if ctx.has_adapter:
                with contextlib.suppress(Exception):  # an unreadable adapter is reported elsewhere
                    sizes += [t.nbytes for t in ctx.adapter().tensors.values()]
            limit = GROWTH * max(sizes, default=0)
        for info in sorted(merged.tensors.values(), key=lambda t: -t.nbytes):
            if limit is not None and info.nbytes > limit:
                raise CheckpointError(
                    f"{info.file}: tensor {info.name!r} holds {info.nbytes / GIB:.2f} GiB, more"
                    f" than {GROWTH}x any tensor of the base or the adapter"
                    f" ({limit / GROWTH / GIB:.3f} GiB): refusing to read it (a merge never"
                    " grows a tensor)"
                )
            problem = shortfall(2 * info.nbytes, "cpu", f"tensor {info.name!r}")
            if problem is not None:
                raise CheckpointError(f"{info.file}: {problem}; refusing to read it")
            break  # sorted by size: the largest decides
        return limit

    return ctx.memo(SIZES, compute)
