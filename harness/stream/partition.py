"""Divide one streamed pass into parts: by bytes, along shard files, deterministic.

The pass over a merged checkpoint (and its base) is cut into ``count`` parts that pytest-xdist
workers or CI matrix jobs process independently; their results combine into exactly what one
process computes. A part is a contiguous run of the merged checkpoint's tensors in file order,
plus a share of the base tensors that run does not read (they only need digests). Cuts fall on
shard-file boundaries when there are at least as many files as parts, so that a job needs only
its own shard files; otherwise inside files. Tensors that must be judged together (a
``group``) are never separated.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from harness.errors import HarnessError

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Unit:
    """Tensors that go to one part together, the file they are in and the bytes they cost."""

    names: tuple[str, ...]
    file: str
    nbytes: int


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count`` (1-based): the tensors it reads and the bytes they cost."""

    index: int
    count: int
    #: Merged tensors this part compares (with their base counterparts).
    names: frozenset[str]
    #: Base tensors no merged tensor reads, digested by this part.
    base_names: frozenset[str]
    nbytes: int

    @property
    def label(self) -> str:
        """``2/4``."""
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``; a HarnessError otherwise."""
    match = _SHARD.fullmatch(text)
    if match is None:
        raise HarnessError(f"shard {text!r}: expected K/N, for example 2/4")
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= count:
        raise HarnessError(f"shard {text!r}: K must be between 1 and N")
    return index, count


def _cut(weights: Sequence[int], count: int) -> list[int]:
    """Start positions of ``count`` contiguous runs of ``weights``, balanced by their sums.

    A run starts at the element whose midpoint passes the next share of the total; every run
    keeps at least one element while elements last (fewer elements than runs: empty runs last).
    """
    total = sum(weights)
    starts = [0]
    running = 0
    for position in range(1, len(weights)):
        running += weights[position - 1]
        left = count - len(starts)
        if left == 0:
            break
        share = total * len(starts) / count
        if running + weights[position] / 2 > share or len(weights) - position <= left:
            starts.append(position)
    starts += [len(weights)] * (count - len(starts))
    return starts


def _runs(items: Sequence[Unit], count: int) -> list[list[Unit]]:
    """``items`` in ``count`` contiguous runs, cut on file boundaries when files suffice."""
    files: list[list[Unit]] = []
    for unit in items:
        if files and files[-1][0].file == unit.file:
            files[-1].append(unit)
        else:
            files.append([unit])
    if len(files) >= count:
        starts = _cut([sum(u.nbytes for u in f) for f in files], count)
        bounds = [*starts, len(files)]
        return [[u for f in files[a:b] for u in f] for a, b in itertools.pairwise(bounds)]
    starts = _cut([u.nbytes for u in items], count)
    bounds = [*starts, len(items)]
    return [list(items[a:b]) for a, b in itertools.pairwise(bounds)]


def units(
    tensors: Iterable[tuple[str, str, int]], groups: Iterable[Iterable[str]] = ()
) -> list[Unit]:
    """``(name, file, nbytes)`` in file order -> units, joining each group into one unit.

    A group's unit sits where its first member is; its bytes are the members' sum.
    """
    ordered = list(tensors)
    owner: dict[str, int] = {}
    for number, members in enumerate(groups):
        for name in members:
            owner[name] = number
    merged: dict[int, list[tuple[str, str, int]]] = {}
    result: list[Unit | int] = []
    for name, file, nbytes in ordered:
        found = owner.get(name)
        if found is None:
            result.append(Unit((name,), file, nbytes))
        elif found not in merged:
            merged[found] = [(name, file, nbytes)]
            result.append(found)
        else:
            merged[found].append((name, file, nbytes))
    out: list[Unit] = []
    for entry in result:
        if isinstance(entry, Unit):
            out.append(entry)
        else:
            joined = merged[entry]
            names = tuple(m[0] for m in joined)
            out.append(Unit(names, joined[0][1], sum(m[2] for m in joined)))
    return out


def plan_parts(
    merged: Sequence[Unit], base_only: Sequence[Unit], count: int
) -> list[Part]:
    """``count`` parts of the pass: merged units and base-only units, each balanced by bytes."""
    if count < 1:
        raise HarnessError(f"a pass cannot be divided into {count} parts")
    runs = _runs(merged, count)
    rest = _runs(base_only, count) if base_only else [[] for _ in range(count)]
    return [
        Part(
            index,
            count,
            frozenset(name for unit in run for name in unit.names),
            frozenset(name for unit in extra for name in unit.names),
            sum(u.nbytes for u in run) + sum(u.nbytes for u in extra),
        )
        for index, (run, extra) in enumerate(zip(runs, rest, strict=True), 1)
    ]
