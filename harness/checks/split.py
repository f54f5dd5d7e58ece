"""The streamed pass divided: part K of N for a CI job, or parts shared by pytest-xdist workers.

Both modes cut the same deterministic plan (``stream.partition``): parts balanced by bytes,
along shard files where there are enough of them, a tensor's base counterpart read with it.

- ``--merge-shard K/N``: this run computes part K only (:func:`shard_part`) and its report
  carries it; ``merge-harness combine`` puts the N reports together.
- Under pytest-xdist the controller gives every worker one shared private folder. The first
  worker that needs the pass takes parts one at a time (an exclusive ``flock`` per part, so a
  part is computed once), writes each result there, then waits for the parts other workers
  hold and combines them all (:func:`shared_pass`). A worker that arrives later only reads and
  combines. A worker that died holding a part releases its lock with its process, and the
  part is computed again by whoever waits for it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from harness.checks.sizes import justified_sizes
from harness.errors import HarnessError
from harness.io.checkpoint import Checkpoint
from harness.io.safetensors import SafetensorsFile
from harness.oracle.parts import Combined, PartResult, combine_parts, plan_digest
from harness.oracle.stream import OraclePass
from harness.run.context import Context, Key
from harness.run.result import CheckResult, Family
from harness.run.settings import Settings
from harness.stream.hashing import adapter_digest
from harness.stream.partition import Part, plan_parts, units
from harness.stream.pipeline import default_workers
from harness.stream.scan import scan_checkpoint

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: workers do not share, each runs the pass
    fcntl = None  # type: ignore[assignment]

PART: Key[PartResult] = Key("pass:part")
SHARED: Key[Combined] = Key("pass:shared")
ADAPTER_DIGEST: Key[str] = Key("digest:adapter")
FINGERPRINT: Key[dict[str, str]] = Key("fingerprint")
#: Parts per sharing worker: more than one, so a worker that arrives late still takes some.
PARTS_PER_WORKER = 2


def uses_oracle(ctx: Context) -> bool:
    """Whether the pass is the oracle's (base and adapter given, weights selected)."""
    return ctx.has_base and ctx.has_adapter and ctx.settings.runs(Family.WEIGHTS)


def adapter_fingerprint(ctx: Context) -> str:
    """The adapter's canonical digest (cached: the lock check and the fingerprint share it)."""
    return ctx.memo(ADAPTER_DIGEST, lambda: adapter_digest(ctx.adapter()))


#: Bytes of each sampled block, and blocks per file, of the identity of a checkpoint.
SAMPLE_BLOCK = 4096
SAMPLE_BLOCKS = 256


def _sample(file: SafetensorsFile, outer: Any) -> None:
    """Feed ``outer`` with evenly spaced blocks of a file's data (all of it when small).

    Each part reads only its own tensors, so nothing else ties the parts to the same weights:
    a job that read a stale or different copy with the same layout would go unnoticed. These
    1 MiB per file, the same in every job, catch a copy whose weights differ in any sampled
    block (a merge of other weights differs in nearly every block).
    """
    start = 8 + file.header_size
    length = max(0, file.size - start)
    if length <= SAMPLE_BLOCK * SAMPLE_BLOCKS:
        offsets = [start]
        block = length
    else:
        step = (length - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1)
        offsets = [start + i * step for i in range(SAMPLE_BLOCKS)]
        block = SAMPLE_BLOCK
    try:
        with file.path.open("rb") as handle:
            for offset in offsets:
                handle.seek(offset)
                data = handle.read(block)
                if len(data) != block:
                    raise HarnessError(f"{file.path}: truncated")
                outer.update(data)
    except OSError as exc:
        raise HarnessError(f"{file.path}: cannot read: {exc.strerror or exc}") from None


def _header_digest(checkpoint: Checkpoint) -> str:
    """What identifies a checkpoint's copy cheaply: headers, file sizes, config, sampled bytes.

    Parts run on other machines; combine requires every part to have seen the same identity.
    """
    outer = hashlib.sha256(b"merge-harness inputs\n")
    for info in checkpoint.in_file_order():
        outer.update(f"{info.name}\t{info.dtype}\t{list(info.shape)}\t{info.file.name}\t"
                     f"{info.start}\t{info.end}\n".encode("utf-8", "surrogateescape"))
    for file in checkpoint.files:
        outer.update(f"{file.path.name}\t{file.size}\n".encode("utf-8", "surrogateescape"))
        _sample(file, outer)
    config = json.dumps(checkpoint.config, sort_keys=True, default=str)
    outer.update(config.encode("utf-8", "surrogateescape"))
    return outer.hexdigest()


def config_digest(settings: Settings) -> str | None:
    """sha256 of the gate configuration file the run read (None without one)."""
    source = settings.config.source
    return hashlib.sha256(source.read_bytes()).hexdigest() if source is not None else None


def _settings_digest(settings: Settings) -> str:
    """The settings a part's verdicts depend on: the tolerance and the pickle opt-in."""
    text = json.dumps(
        {"ulp_tolerance": settings.ulp_tolerance, "allow_pickle": settings.allow_pickle},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(ctx: Context) -> dict[str, str]:
    """The identity of this run's inputs and settings, equal in every part of one combine."""

    def compute() -> dict[str, str]:
        found = {"merged": _header_digest(ctx.merged()),
                 "settings": _settings_digest(ctx.settings)}
        config = config_digest(ctx.settings)
        if config is not None:
            found["config"] = config
        if ctx.has_base:
            found["base"] = _header_digest(ctx.base())
        if ctx.has_adapter:
            found["adapter"] = adapter_fingerprint(ctx)
        return found

    return ctx.memo(FINGERPRINT, compute)


class Divided:
    """The pass of this run, planned: what each part reads, and how to compute one part."""

    def __init__(self, ctx: Context, count: int, threads: int | None) -> None:
        self.ctx = ctx
        justified_sizes(ctx)
        self.oracle: OraclePass | None = None
        if uses_oracle(ctx):
            settings = ctx.settings
            self.oracle = OraclePass(
                ctx.merged(), ctx.base(), [ctx.adapter()], settings.ulp_tolerance,
                scans=True, workers=threads,
            )
            merged_units, base_units = self.oracle.units()
        else:
            merged_units = units((i.name, i.file.name, i.nbytes)
                                 for i in ctx.merged().in_file_order())
            base_units = (
                units((i.name, i.file.name, i.nbytes) for i in ctx.base().in_file_order())
                if ctx.has_base
                else []
            )
        self.parts = plan_parts(merged_units, base_units, count)
        self.plan = plan_digest(self.parts)

    def compute(self, part: Part) -> PartResult:
        """Read and judge one part of the pass."""
        ctx = self.ctx
        merged_order = [i.name for i in ctx.merged().in_file_order() if i.name in part.names]
        base_order = (
            [i.name for i in ctx.base().in_file_order() if i.name in part.base_names]
            if ctx.has_base
            else []
        )
        found = PartResult(part.index, part.count, self.plan, merged_order, base_order,
                           oracle=self.oracle is not None)
        started = time.perf_counter()
        if self.oracle is not None:
            result, merged_scan, base_scan = self.oracle.run(part)
            assert merged_scan is not None and base_scan is not None
            found.problem, found.k = result.problem, result.k
            found.adapters = [{"path": str(ctx.adapter().root),
                               "peft_type": ctx.adapter().peft_type}]
            found.tensors = result.tensors
            found.missing = self.oracle.missing() if part.index == 1 else []
            found.bytes_read = result.bytes_read
        else:
            merged_scan = scan_checkpoint(ctx.merged(), names=part.names)
            base_scan = (
                scan_checkpoint(ctx.base(), names=part.base_names) if ctx.has_base else None
            )
            found.bytes_read = sum(ctx.merged().tensors[n].nbytes for n in merged_order) + sum(
                ctx.base().tensors[n].nbytes for n in base_order
            )
        found.merged_digests = dict(merged_scan.manifest.tensors)
        found.merged_nonfinite = dict(merged_scan.nonfinite)
        if base_scan is not None:
            found.base_digests = dict(base_scan.manifest.tensors)
            found.base_nonfinite = dict(base_scan.nonfinite)
        found.seconds = time.perf_counter() - started
        return found


def shard_part(ctx: Context) -> PartResult:
    """Part K of N of this run's pass (``--merge-shard K/N``), computed once per process."""
    shard = ctx.settings.shard
    if shard is None:
        raise HarnessError("not a sharded run")
    index, count = shard

    def compute() -> PartResult:
        divided = Divided(ctx, count, None)
        return divided.compute(divided.parts[index - 1])

    return ctx.memo(PART, compute)


@contextlib.contextmanager
def _locked(path: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (True), or False at once when another holds it."""
    with open(path, "a+b") as handle:
        try:
            assert fcntl is not None
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write(path: Path, part: PartResult) -> None:
    """Publish a part's result atomically (a reader never sees half a file)."""
    handle: IO[str]
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".part-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(part.to_json(), handle, allow_nan=False)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _take(
    folder: Path, stem: str, compute: Callable[[], PartResult], *, wait: bool
) -> PartResult | None:
    """The part's result: read if published, computed under its lock otherwise.

    None without ``wait`` when another worker holds the part's lock (it is computing it).
    """
    result = folder / f"{stem}.json"
    with _locked(folder / f"{stem}.lock", wait=wait) as held:
        if not held:
            return None
        if result.exists():
            return PartResult.from_json(json.loads(result.read_text(encoding="utf-8")))
        part = compute()
        _write(result, part)
        return part


def shared_pass(ctx: Context, folder: Path, workers: int) -> Combined:
    """The whole pass, computed together with the other xdist workers sharing ``folder``."""

    def compute() -> Combined:
        threads = max(1, default_workers() // max(1, workers))
        divided = Divided(ctx, PARTS_PER_WORKER * max(1, workers), threads)
        kind = "oracle" if divided.oracle is not None else "scan"
        stems = {p.index: f"{kind}-{divided.plan[:16]}-{p.index}" for p in divided.parts}
        found: dict[int, PartResult] = {}
        if fcntl is None:  # pragma: no cover - no advisory locks: this worker does it all
            found = {p.index: divided.compute(p) for p in divided.parts}
        for wait in (False, True):
            for part in divided.parts:
                if part.index in found:
                    continue
                compute_one = functools.partial(divided.compute, part)
                taken = _take(folder, stems[part.index], compute_one, wait=wait)
                if taken is not None:
                    found[part.index] = taken
        combined = combine_parts([(f"part {i}", found[i]) for i in sorted(found)])
        if divided.oracle is not None and combined.oracle is not None:
            divided.oracle.finish(combined.oracle)
        return combined

    return ctx.memo(SHARED, compute)


def record_part(ctx: Context) -> CheckResult:
    """What a streamed check reports in a sharded run: its part was computed, not judged."""
    part = shard_part(ctx)
    gigabytes = part.bytes_read / 1e9
    return CheckResult.skipped(
        f"part {part.label} recorded: {len(part.names)} merged and {len(part.base_names)}"
        f" base-only tensor(s), {gigabytes:.3g} GB read; merge-harness combine judges the parts"
    )
