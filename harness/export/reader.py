"""Open a GGUF export safely: the ``gguf`` package's own reader, behind guards that bound it.

``gguf.GGUFReader`` maps the file with numpy and walks the header, trusting every count and
length in it: an array declared 2**60 elements long whose elements lie past the end of the file
makes it loop, appending empty views, without end; a string or tensor past the end becomes a
confusing reshape error. The reader used here is gguf's, with its one read primitive guarded
(every read must lie inside the file, a header may hold at most :data:`MAX_HEADER_READS` values
and one string at most :data:`MAX_STRING_BYTES`), so a hostile or truncated file is an
:class:`~harness.errors.ExportError` with a one-line cause, in bounded memory.

The map is used for the header only. Tensor bytes are read with ordinary file reads by the value
pass: pages of a map that were touched count toward the process's resident memory until the
kernel needs them back, so mapping a multi-gigabyte file would look like (and, under memory
pressure, be) a multi-gigabyte process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from harness.errors import CheckpointError, ExportError, one_line
from harness.io.files import check_regular_file

#: Values the header may hold (the reader keeps one small array per value, about 250 bytes
#: each): a 262K-token vocabulary with its scores and types needs about 1.05 million, a 128K one
#: with its merges about 0.95 million.
MAX_HEADER_READS = 2_000_000
#: Header reads up to this size are copied out of the map: a copy costs 250 bytes, a view of
#: the map 600 (numpy's memmap subclass carries its own attributes).
SMALL_READ = 4096
#: Longest string in a header (token texts are short; chat templates are kilobytes).
MAX_STRING_BYTES = 16 * 1024 * 1024
#: ``<prefix>-00001-of-00003.gguf``: how llama.cpp names the parts of a split GGUF.
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_COUNT
SPLIT_INDEX = gguf.Keys.Split.LLM_KV_SPLIT_NO


class _PastEnd(Exception):
    """A read the header asked for lies beyond the end of the file."""

    def __init__(self, phase: str, end: int, size: int) -> None:
        super().__init__(phase, end, size)
        self.phase = phase
        self.end = end
        self.size = size


class _Guarded(gguf.GGUFReader):
    """gguf's reader with its read primitive bounded (every other line of it is gguf's)."""

    def __init__(self, path: Path, size: int) -> None:
        self._size = size
        self._reads = 0
        self._phase = "header"
        super().__init__(path, "r")

    def _charge(self, end: int) -> None:
        """One header read ending at byte ``end``: inside the file, and within the budget."""
        if end > self._size:
            raise _PastEnd(self._phase, end, self._size)
        self._reads += 1
        if self._reads > MAX_HEADER_READS:
            raise ExportError(
                f"header holds more than {MAX_HEADER_READS:,} values (refused to keep"
                " memory bounded; not a model export, or hostile)"
            )

    def _get(
        self,
        offset: int,
        dtype: Any,
        count: int = 1,
        override_order: Any = None,
    ) -> Any:
        count = int(count)
        offset = int(offset)
        end = offset + np.dtype(dtype).itemsize * count
        if offset < 0 or count < 0 or end > self._size:
            raise _PastEnd(self._phase, end, self._size)
        if self._phase == "header":
            self._charge(end)
        # gguf's own _get, on a plain-ndarray view of its map: slicing numpy's memmap subclass
        # costs a Python-level __array_finalize__ per view, most of the time a 32K-token header
        # takes to read.
        found = self._plain()[offset:end].view(dtype=dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        found = found.view(found.dtype.newbyteorder(order))
        return np.array(found) if end - offset <= SMALL_READ else found

    def _plain(self) -> np.ndarray:
        plain: np.ndarray | None = self.__dict__.get("_plain_data")
        if plain is None:
            plain = self._plain_data = self.data.view(np.ndarray)
        return plain

    def _get_str(self, offset: int) -> Any:
        length = int(self._get(offset, np.uint64)[0])
        if length > MAX_STRING_BYTES:
            raise ExportError(
                f"a header string at byte {offset} declares {length:,} bytes (limit"
                f" {MAX_STRING_BYTES:,}; not a model export, or hostile)"
            )
        return super()._get_str(offset)

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[Any], list[int], list[Any]]:
        """gguf's, except for a non-empty array of numbers or strings.

        gguf reads an array element by element, through a recursive call, an enum lookup and one
        numpy view per element: nine tenths of the time a 32K-token header takes. Here an array
        of numbers is one read and the strings of an array one slice each, with the same bounds
        and the same count of reads against :data:`MAX_HEADER_READS` as gguf's walk (so the
        same file is refused at the same point, with the same message). The array's parts hold
        the numbers in one piece, which ``ReaderField.contents()`` flattens as before.
        """
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        header = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        length = int(header[1][0])
        start = orig_offs + 12
        if length == 0:
            return 12, list(header), [], [gguf.GGUFValueType.ARRAY]
        item = gguf.GGUFValueType(int(header[0][0]))
        parts: list[Any]
        if item == gguf.GGUFValueType.STRING:
            parts, end = self._strings(start, length)
        else:
            scalar = self.gguf_scalar_to_np.get(item)
            if scalar is None:  # nested arrays: gguf's own walk (flattened, as gguf does)
                self._reads -= 2
                return super()._get_field_parts(orig_offs, raw_type)
            numbers = self._numbers(start, length, np.dtype(scalar))
            parts, end = [numbers], start + numbers.nbytes
        types = [gguf.GGUFValueType.ARRAY, item]
        return end - orig_offs, [*header, *parts], list(range(2, 2 + len(parts))), types

    def _numbers(self, start: int, length: int, dtype: np.dtype[Any]) -> np.ndarray:
        """``length`` numbers at ``start``, charged as gguf's one read per element."""
        size = dtype.itemsize
        # the first element gguf's walk would fail on: past the end, or over the budget
        past = max(0, (self._size - start) // size)
        allowed = MAX_HEADER_READS - self._reads
        if past < length and past <= allowed:
            self._reads += past
            raise _PastEnd(self._phase, start + (past + 1) * size, self._size)
        if allowed < length:
            self._reads += allowed
            self._charge(start + (allowed + 1) * size)
        self._reads += length
        found = self._plain()[start : start + length * size].view(dtype)
        return np.array(found) if length * size <= SMALL_READ else found

    def _strings(self, offset: int, length: int) -> tuple[list[memoryview], int]:
        """The strings of an array: three reads each, as gguf's walk through _get_str."""
        whole = self._plain().data
        found: list[memoryview] = []
        for _ in range(length):
            # _get_str's length read, then gguf's own: the length again and the bytes
            self._charge(offset + 8)
            size = int.from_bytes(whole[offset : offset + 8], "little")
            if size > MAX_STRING_BYTES:
                raise ExportError(
                    f"a header string at byte {offset} declares {size:,} bytes (limit"
                    f" {MAX_STRING_BYTES:,}; not a model export, or hostile)"
                )
            self._charge(offset + 8)
            self._charge(offset + 8 + size)
            found.append(whole[offset + 8 : offset + 8 + size])
            offset += 8 + size
        return found, offset

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        self._phase = "tensors"
        super()._build_tensors(start_offs, fields)


@dataclass(frozen=True)
class ExportTensor:
    """One tensor of a GGUF: its type, numpy-order shape and absolute byte range."""

    name: str
    type: gguf.GGMLQuantizationType
    #: numpy (row-major) order: the reverse of GGUF's dimension list, as the converter wrote
    #: it from the torch tensor; quantized types pack blocks along the last dimension.
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def block_size(self) -> int:
        """Elements per block of this type (1 for plain floats)."""
        return int(gguf.GGML_QUANT_SIZES[self.type][0])

    @property
    def type_size(self) -> int:
        """Bytes per block of this type."""
        return int(gguf.GGML_QUANT_SIZES[self.type][1])

    @property
    def row_length(self) -> int:
        """Elements per row (the last dimension)."""
        return self.shape[-1] if self.shape else 1

    @property
    def rows(self) -> int:
        """Rows: the product of every dimension but the last."""
        return self.numel // self.row_length if self.row_length else 0

    @property
    def row_bytes(self) -> int:
        """Bytes per row."""
        return self.row_length // self.block_size * self.type_size


@dataclass
class ExportFile:
    """A validated GGUF export (all parts of a split one): metadata and tensor locations."""

    path: Path
    parts: tuple[Path, ...]
    size: int
    fields: dict[str, Any]
    tensors: dict[str, ExportTensor] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        """``general.architecture`` (``llama``, ``qwen2``...)."""
        value = self.fields.get(gguf.Keys.General.ARCHITECTURE)
        return value if isinstance(value, str) else ""

    def key(self, template: str) -> str:
        """An architecture key: ``{arch}.context_length`` -> ``llama.context_length``."""
        return template.format(arch=self.architecture)

    def get(self, template: str) -> Any:
        """The value of an (architecture) key, or None."""
        return self.fields.get(self.key(template))

    @property
    def label(self) -> str:
        """The file name, as checks name the export."""
        return self.path.name


def _decode(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, entry in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            fields[name] = entry.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise ExportError(
                f"{path}: metadata {name!r} cannot be decoded: {one_line(exc)}"
            ) from None
    return fields


def _tensors(reader: gguf.GGUFReader, path: Path) -> dict[str, ExportTensor]:
    found: dict[str, ExportTensor] = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        found[tensor.name] = ExportTensor(
            tensor.name, tensor.tensor_type, shape, path, int(tensor.data_offset),
            int(tensor.n_bytes),
        )
    return found


def _open_part(path: Path) -> tuple[dict[str, Any], dict[str, ExportTensor], int]:
    try:
        size = check_regular_file(path)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    if size < 24:
        raise ExportError(f"{path}: not a GGUF file ({size} bytes)")
    try:
        reader = _Guarded(path, size)
        if reader.byte_order != "I":
            raise ExportError(f"{path}: a big-endian GGUF (not supported: convert little-endian)")
        return _decode(reader, path), _tensors(reader, path), size
    except ExportError as exc:
        message = str(exc)
        raise ExportError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None
    except _PastEnd as exc:
        if exc.phase == "tensors":
            raise ExportError(
                f"{path}: truncated: tensor data reaches byte {exc.end:,} but the file ends at"
                f" byte {exc.size:,}"
            ) from None
        raise ExportError(
            f"{path}: the header runs past the end of the file (byte {exc.end:,} of"
            f" {exc.size:,}): truncated, or a count or length in it is wrong"
        ) from None
    except OSError as exc:
        raise ExportError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError) as exc:
        raise ExportError(f"{path}: not a readable GGUF file: {one_line(exc)}") from None


def split_parts(path: Path, count: int) -> tuple[Path, ...]:
    """Every part of a split GGUF whose first part is ``path`` (``count`` parts in all)."""
    match = SPLIT_NAME.match(path.name)
    if match is None or int(match["index"]) != 1:
        raise ExportError(
            f"{path}: holds part of a split GGUF ({count} parts) but is not named"
            " <name>-00001-of-NNNNN.gguf: pass the first part"
        )
    prefix = match["prefix"]
    return tuple(
        path.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    )


def open_export(path: Path) -> ExportFile:
    """Open and validate a GGUF export (the first part of a split one opens every part)."""
    fields, tensors, size = _open_part(path)
    count = fields.get(SPLIT_COUNT)
    parts: tuple[Path, ...] = (path,)
    if isinstance(count, int) and count > 1:
        index = fields.get(SPLIT_INDEX)
        if index not in (0, None):
            raise ExportError(f"{path}: is part {int(index) + 1} of a split GGUF: pass the first")
        parts = split_parts(path, count)
        for part in parts[1:]:
            if not part.exists():
                raise ExportError(f"{path}: split part {part.name} is missing")
            _, more, more_size = _open_part(part)
            size += more_size
            for name, tensor in more.items():
                if name in tensors:
                    raise ExportError(f"{path}: tensor {name!r} is stored in two parts")
                tensors[name] = tensor
    if not isinstance(fields.get(gguf.Keys.General.ARCHITECTURE), str):
        raise ExportError(f"{path}: no general.architecture: not a model GGUF")
    return ExportFile(path, parts, size, fields, tensors)
