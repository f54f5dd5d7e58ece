"""The streaming merger: base + adapter(s) -> a merged safetensors checkpoint, tensor by tensor.

Bit for bit what peft's ``merge_and_unload`` followed by ``save_pretrained`` writes (each edit's
:meth:`~harness.deltas.base.Edit.merge` replays peft's rounding path), but without loading a model:
a reader thread streams base tensors in file order, the main thread applies the edits of one
tensor, and a writer thread appends the result to the output shard, so reads, arithmetic and
writes overlap and only a few tensors are held at a time.

The output keeps the base's tensor set, dtypes and shard plan (or re-shards to
``max_shard_size``), copies ``config.json``, ``generation_config.json``, tokenizer files and custom
code (each read as a bounded regular file inside its folder), and is written into a marked
staging folder beside ``out``, under an exclusive lock on ``out``, that is renamed into place at
the end (:mod:`harness.io.staging`: two merges into one output, SIGKILL debris, a full disk).
A base that ties its output head to the input embedding is untied (``tie_word_embeddings=false``
and a separate ``lm_head.weight``) when the adapter changes one side of the tie and not the other
— exactly what the unmerged adapter model computes, which peft's merge does for
``modules_to_save=["lm_head"]`` but not for LoRA on a tied embedding or head (peft then writes
the changed shared tensor for both, see peft issue 2777).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from harness.deltas import Plan, Target, plan_adapters
from harness.deltas.growth import needed_rows
from harness.errors import MergeError
from harness.io.adapter import Adapter
from harness.io.checkpoint import INDEX_FILE, Checkpoint
from harness.io.files import MAX_JSON_BYTES, exists, read_bounded
from harness.io.safetensors import TensorInfo, tensor_from_bytes
from harness.io.staging import exclusive, partial, publish, remove_stale, staging, write_file
from harness.stream.pipeline import StreamPass
from harness.stream.writer import Entry, Writer, as_bytes, parse_size, plan_shards

#: Files copied from the base (and, for tokenizers, overridden by an adapter's own copy).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
#: Largest side file copied (tokenizer.json files of large vocabularies are tens of MB).
MAX_SIDE_FILE = MAX_JSON_BYTES
#: Side files an adapter folder may carry that supersede the base's (a retrained tokenizer).
ADAPTER_OVERRIDES = frozenset(SIDE_FILES) - {"generation_config.json"}


def _path_inside(inner: Path, outer: Path) -> bool:
    try:
        inner.resolve().relative_to(outer.resolve())
    except ValueError:
        return False
    return True


def _check_paths(base: Path, adapters: Sequence[Path], out: Path, overwrite: bool) -> None:
    for label, source in [("base", base)] + [("adapter", a) for a in adapters]:
        if _path_inside(out, source):
            raise MergeError(f"{out}: the output must not be inside the {label} folder {source}")
        if _path_inside(source, out):
            raise MergeError(f"{out}: the output folder contains the {label} folder {source}")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise MergeError(f"{out}: exists and is not a folder; refusing to replace it")
        if not overwrite:
            raise MergeError(f"{out}: already exists (pass --overwrite to replace it)")


def _untie(plan: Plan) -> bool:
    """Whether the merge makes a tied head differ from the input embedding."""
    source = plan.target.tie_source
    if source is None or plan.tied_head is None:
        return False
    head, embed = plan.for_tensor(plan.tied_head), plan.for_tensor(source)
    return len(head) != len(embed) or any(a is not b for a, b in zip(head, embed, strict=True))


def _copy_side_files(base: Path, adapters: Sequence[Path], tmp: Path, config: dict[str, Any] | None,
                     untie: bool) -> None:
    if config is not None:
        merged_config = dict(config)
        if untie:
            merged_config["tie_word_embeddings"] = False
        text = json.dumps(merged_config, indent=2, sort_keys=True) + "\n"
        write_file(partial(tmp, "config.json"), text.encode())
    for name in SIDE_FILES:
        source = base / name
        for adapter in adapters:
            if name in ADAPTER_OVERRIDES and exists(adapter / name):
                source = adapter / name
        if exists(source):
            # a symlink out of its folder (to a secret of the machine) is refused, never copied
            write_file(partial(tmp, name), read_bounded(source, MAX_SIDE_FILE, what="side file"))
    for code in sorted(base.glob("*.py")):
        write_file(partial(tmp, code.name), read_bounded(code, MAX_SIDE_FILE, what="code file"))


class Terminated(BaseException):
    """SIGTERM arrived: raised like ``KeyboardInterrupt`` so that the merge cleans up."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def merge_checkpoint(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    allow_pickle: bool = False,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """Merge ``adapter`` (or several, in sequence) into ``base`` and write the result to ``out``.

    Returns ``out``. Raises a :class:`~harness.errors.HarnessError` with a one-line cause for an
    unreadable input, an adapter type the registry does not know, an existing ``out`` (unless
    ``overwrite``), an ``out`` inside an input folder, another merge into ``out`` running, or a
    write error (a full disk). Nothing is left behind on failure or interruption; the debris
    of an earlier merge killed outright is removed, and ``notify`` is told.
    """
    base_path = Path(base)
    adapter_paths = (
        [Path(adapter)] if isinstance(adapter, (str, os.PathLike)) else [Path(a) for a in adapter]
    )
    if not adapter_paths:
        raise MergeError("no adapter to merge")
    out_path = Path(out)
    _check_paths(base_path, adapter_paths, out_path, overwrite)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    checkpoint = Checkpoint.open(base_path, allow_pickle=allow_pickle)
    adapters = [Adapter.open(p, allow_pickle=allow_pickle) for p in adapter_paths]
    plan = plan_adapters(adapters, Target(checkpoint.tensors, checkpoint.config or {}))
    grown = needed_rows(plan)
    if grown:
        name, (rows, needed) = sorted(grown.items())[0]
        raise MergeError(
            f"the adapter was trained on a resized vocabulary ({name}: {needed} rows, the base"
            f" has {rows}); merge-harness merge does not resize: call resize_token_embeddings"
            " and merge with peft, then verify the result against this base"
        )
    untie = _untie(plan)
    extra: dict[str, Entry] = {}
    source = plan.target.tie_source
    if untie and source is not None and plan.tied_head is not None:
        info = checkpoint.tensors[source]
        extra[source] = Entry(plan.tied_head, info.dtype, info.shape, info.nbytes, info)
    shards = plan_shards(checkpoint, extra, limit)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(out_path):
            for folder in remove_stale(out_path):
                if notify is not None:
                    notify(f"removed {folder}, left by an interrupted merge")
            existed = out_path.exists() or out_path.is_symlink()
            if existed and not overwrite:
                raise MergeError(f"{out_path}: already exists (pass --overwrite to replace it)")
            with staging(out_path) as tmp:
                _write(tmp, checkpoint, plan, extra, shards, workers, progress, base_path,
                       adapter_paths, untie)
                publish(tmp, out_path, overwrite=overwrite, existed=existed)
    except OSError as exc:
        raise MergeError(f"{out_path}: cannot write the merge: {exc.strerror or exc}") from None
    return out_path


def _write(tmp: Path, checkpoint: Checkpoint, plan: Plan, extra: dict[str, Entry],
           shards: list[Any], workers: int | None, progress: bool, base_path: Path,
           adapter_paths: list[Path], untie: bool) -> None:
    """Stream the merged tensors, the index and the side files into the staging folder."""
    largest = max((i.nbytes for i in checkpoint.tensors.values()), default=0)
    stream = StreamPass(largest, headroom=2.0, pool_share=0.5, workers=workers)
    pool = stream.pool

    def read(info: TensorInfo) -> tuple[TensorInfo, bytearray]:
        return info, checkpoint.read_into(info.name, pool)

    writer = Writer(tmp, shards, stream.budget, pool)
    total = sum(s.nbytes for s in shards)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=not progress)

    def process(item: tuple[TensorInfo, bytearray]) -> list[memoryview | bytearray]:
        info, data = item
        # an untied head starts from the base embedding: copy it before edits change it
        original = None
        if info.name in extra:
            original = pool.get(len(data))
            original[:] = data
        outputs = [_apply(plan.for_tensor(info.name), info, data)]
        if original is not None:
            outputs.append(_apply(plan.for_tensor(extra[info.name].name), info, original))
        for edit in plan.for_tensor(info.name):
            edit.release()
        return outputs

    try:
        for outputs in stream.run(
            checkpoint.in_file_order(),
            read,
            process,
            lambda info: info.nbytes * (2 if info.name in extra else 1),
        ):
            for output in outputs:
                writer.put(output)
                bar.update(len(output))
    except BaseException:
        writer.slots.put(None)
        writer.thread.join()
        raise
    finally:
        bar.close()
    writer.finish()
    plan.release()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {e.name: s.name for s in shards for e in s.entries},
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        write_file(partial(tmp, INDEX_FILE), text.encode())
    _copy_side_files(base_path, adapter_paths, tmp, checkpoint.config, untie)


def _apply(edits: list[Any], info: TensorInfo, data: bytearray) -> memoryview | bytearray:
    """The merged bytes of one tensor: ``data`` itself when no edit applies or all edit in place."""
    if not edits:
        return data
    tensor = tensor_from_bytes(info, data)
    for edit in edits:
        tensor = edit.merge(tensor)
    if tensor.data_ptr() == tensor_from_bytes(info, data).data_ptr() and tensor.is_contiguous():
        return data
    return as_bytes(tensor)
