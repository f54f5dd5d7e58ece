"""Tensor-level parallelism for the streamed passes (oracle, merger).

Each tensor is processed by one worker thread with torch's intra-op pool set to one thread;
the workers run concurrently because torch and hashlib release the GIL. On an idle machine
this is as fast as torch's own parallel ops (the work is memory-bound), and on an
oversubscribed one (a shared CI runner) it is far faster: an intra-op pool waits at every op
for its slowest thread, which costs a scheduler quantum per op when the cores are busy
(measured: 20 ms instead of 0.3 ms per elementwise op on a 512K-element block).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")

_lock = threading.Lock()
_depth = 0
_saved = 0


def default_workers() -> int:
    """Worker threads: ``MERGE_HARNESS_WORKERS``, else the CPUs this process may use (max 8)."""
    configured = os.environ.get("MERGE_HARNESS_WORKERS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Set torch's intra-op pool to one thread for the duration (re-entrant, restored after)."""
    import torch

    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.set_num_threads(_saved)


class ByteBudget:
    """A bound on the bytes of tensors in flight between a reader, workers and a writer.

    ``acquire`` blocks while the budget is spent, except when nothing is in flight (a single
    tensor larger than the budget still passes, alone).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.closed = False
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> bool:
        """Reserve ``nbytes``; False when the budget was closed while waiting."""
        with self._cond:
            while not self.closed and self.used and self.used + nbytes > self.limit:
                self._cond.wait()
            if self.closed:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Return ``nbytes`` to the budget."""
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()

    def close(self) -> None:
        """Wake and stop every waiting reader."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()


def pipeline(
    items: Iterable[T],
    read: Callable[[T], R],
    work: Callable[[R], S],
    size: Callable[[T], int],
    budget: ByteBudget,
    workers: int,
) -> Iterator[S]:
    """Read items on a reader thread, process them on ``workers`` threads, yield in order.

    The reader reserves ``size(item)`` bytes of ``budget`` before reading an item and submits
    its processing at once; the consumer must release each item's bytes when it is done with
    the result (here or later, e.g. on a writer thread). The consumer only ever waits for work
    that is already submitted, and the reader only for bytes the consumer will release, so the
    two cannot wait on each other. Errors of reading or processing are raised in the consumer.
    """
    import queue

    submitted: queue.Queue[Future[S] | BaseException | None] = queue.Queue()
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="merge-harness-worker")

    def run() -> None:
        try:
            for item in items:
                if not budget.acquire(size(item)):
                    break
                data = read(item)
                submitted.put(pool.submit(work, data))
                del data
        except BaseException as exc:  # handed to the consumer, re-raised there
            submitted.put(exc)
            return
        submitted.put(None)

    reader = threading.Thread(target=run, name="merge-harness-reader", daemon=True)
    reader.start()
    try:
        while True:
            entry = submitted.get()
            if entry is None:
                return
            if isinstance(entry, BaseException):
                raise entry
            yield entry.result()
    finally:
        budget.close()
        reader.join()
        pool.shutdown(wait=True, cancel_futures=True)


class BufferPool:
    """Recycles byte buffers by exact size, up to ``limit`` bytes kept, none above ``limit/2``.

    Reading every tensor into a fresh buffer costs a page fault per 4 KiB (the kernel zeroes
    each new page): on a 1.1B-parameter merge that was more system time than the arithmetic.
    Models have few distinct tensor sizes, so recycled buffers are reused almost always.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = 0
        self._free: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> bytearray:
        """A buffer of exactly ``nbytes`` (contents undefined)."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self.kept -= nbytes
                return free.pop()
        return bytearray(nbytes)

    def put(self, buffer: bytearray) -> None:
        """Hand a buffer back for reuse.

        It is dropped when the pool is full, or when it is one of the few huge ones (the
        embeddings) that hardly any other tensor would reuse.
        """
        with self._lock:
            if 2 * len(buffer) <= self.limit and self.kept + len(buffer) <= self.limit:
                self._free.setdefault(len(buffer), []).append(buffer)
                self.kept += len(buffer)


_workspaces = threading.local()
#: Largest scratch tensor kept per worker thread (elements).
WORKSPACE_LIMIT = 1 << 24


def workspace(numel: int, dtype: torch.dtype, slot: str = "delta") -> torch.Tensor | None:
    """A reusable flat scratch tensor of this thread, one per ``slot`` and dtype.

    None when larger than :data:`WORKSPACE_LIMIT` elements (then the caller allocates).
    """
    import torch

    if numel > WORKSPACE_LIMIT:
        return None
    key = f"{slot}:{dtype}"
    cached: dict[str, torch.Tensor] = getattr(_workspaces, "tensors", None) or {}
    _workspaces.tensors = cached
    scratch = cached.get(key)
    if scratch is None or scratch.numel() < numel:
        scratch = torch.empty(numel, dtype=dtype)
        cached[key] = scratch
    return scratch[:numel]


#: Bytes of tensors in flight in a streamed pass: at least this much, whatever the model.
MIN_BUDGET = 256 * 1024 * 1024


class StreamPass:
    """The budget, buffers and threads of one streamed pass over tensors (oracle, merger, scan).

    ``largest`` is the most bytes one item holds while in flight; the budget is ``headroom``
    times that (at least :data:`MIN_BUDGET`), so a few items overlap without memory growing
    with the model. Buffers come from a pool of ``pool_share`` of the budget: reused pages
    instead of fresh, zero-filled ones per tensor.
    """

    def __init__(
        self,
        largest: int,
        *,
        headroom: float = 1.5,
        pool_share: float = 0.25,
        workers: int | None = None,
        floor: int = MIN_BUDGET,
    ) -> None:
        self.budget = ByteBudget(max(floor, int(largest * headroom)))
        self.pool = BufferPool(int(self.budget.limit * pool_share))
        self.workers = workers if workers is not None else default_workers()

    def run(
        self,
        items: Iterable[T],
        read: Callable[[T], R],
        work: Callable[[R], S],
        size: Callable[[T], int],
    ) -> Iterator[S]:
        """:func:`pipeline` over ``items`` with torch single-threaded per worker.

        The consumer releases each item's bytes with ``self.budget.release`` when done with it.
        A pass may run several times (the parts of a divided pass): each run gets a fresh
        budget, since the last one was closed at its end.
        """
        self.budget = ByteBudget(self.budget.limit)
        with single_threaded_torch():
            yield from pipeline(items, read, work, size, self.budget, self.workers)
