"""Hostile and broken GGUF files: one-line failed checks, never a traceback, in bounded memory.

Every hostile file is a real conversion (fixtures/gguf) with one field of its header overwritten,
or a file written by gguf's own writer, as an attacker would make them.
"""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import ExportError
from harness.export import reader
from harness.export.reader import open_export
from harness.run.result import Outcome
from tests.export_cases import export_file, run_export

SOURCE = export_file("q8_0")
#: Peak Python-heap growth allowed while a hostile file is refused.
MEMORY_LIMIT = 32 * 1024 * 1024


def _layout() -> tuple[gguf.GGUFReader, bytes]:
    return gguf.GGUFReader(SOURCE), SOURCE.read_bytes()


def _patched(tmp_path: Path, offset: int, value: bytes, name: str = "hostile.gguf") -> Path:
    data = bytearray(SOURCE.read_bytes())
    data[offset : offset + len(value)] = value
    target = tmp_path / name
    target.write_bytes(bytes(data))
    return target


def _field_value_offset(key: str) -> int:
    """Where a metadata field's value begins (after its key and its type)."""
    field = gguf.GGUFReader(SOURCE).fields[key]
    return field.offset + 8 + len(key.encode()) + 4


def _tensor_info_offset(name: str) -> tuple[int, int]:
    """(offset of the dims count, offset of the data offset) of one tensor's info."""
    tensor = next(t for t in gguf.GGUFReader(SOURCE).tensors if t.name == name)
    start = tensor.field.offset + 8 + len(name.encode())
    dims = len(tensor.shape)
    return start, start + 4 + 8 * dims + 4


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def _hostile(tmp_path: Path, case: str) -> Path:
    if case == "tensor count":
        return _patched(tmp_path, 8, _u64(2**62))
    if case == "metadata count":
        return _patched(tmp_path, 16, _u64(2**62))
    if case == "array length":
        return _patched(tmp_path, _field_value_offset("tokenizer.ggml.tokens") + 4, _u64(2**60))
    if case == "string length":
        return _patched(tmp_path, _field_value_offset("tokenizer.chat_template"), _u64(2**40))
    if case == "key length":
        field = gguf.GGUFReader(SOURCE).fields["general.architecture"]
        return _patched(tmp_path, field.offset, _u64(2**50))
    if case == "tensor offset":
        _, where = _tensor_info_offset("output_norm.weight")
        return _patched(tmp_path, where, _u64(2**45))
    if case == "tensor dimensions":
        start, _ = _tensor_info_offset("token_embd.weight")
        return _patched(tmp_path, start + 4, _u64(2**40) + _u64(2**40))
    if case == "tensor type":
        start, where = _tensor_info_offset("token_embd.weight")
        return _patched(tmp_path, where - 4, _u32(200))
    if case == "value type":
        return _patched(tmp_path, _field_value_offset("general.architecture") - 4, _u32(99))
    if case == "alignment":
        return _gguf_with(tmp_path, lambda w: w.add_uint32("general.alignment", 3))
    if case == "magic":
        return _patched(tmp_path, 0, b"GGUG")
    if case == "version":
        return _patched(tmp_path, 4, _u32(9))
    if case == "invalid utf-8":
        return _patched(tmp_path, _field_value_offset("general.architecture") + 8, b"\xff\xfe")
    if case == "empty":
        target = tmp_path / "empty.gguf"
        target.write_bytes(b"")
        return target
    if case == "ten bytes":
        target = tmp_path / "short.gguf"
        target.write_bytes(SOURCE.read_bytes()[:10])
        return target
    raise AssertionError(case)


def _gguf_with(tmp_path: Path, add) -> Path:
    """A GGUF written by gguf's own writer, with ``add(writer)`` adding hostile content."""
    target = tmp_path / "written.gguf"
    writer = gguf.GGUFWriter(target, "llama")
    add(writer)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


CASES = (
    "tensor count", "metadata count", "array length", "string length", "key length",
    "tensor offset", "tensor dimensions", "tensor type", "value type", "alignment", "magic",
    "version", "invalid utf-8", "empty", "ten bytes",
)


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_header_is_one_line_in_bounded_memory(tmp_path, case):
    target = _hostile(tmp_path, case)
    tracemalloc.start()
    try:
        with pytest.raises(ExportError) as caught:
            open_export(target)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(target))
    assert peak < MEMORY_LIMIT, f"{case}: {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("case", ["tensor count", "string length", "tensor offset", "empty"])
def test_a_hostile_export_fails_every_check_with_its_cause(tmp_path, case):
    results = run_export(_hostile(tmp_path, case))
    for result in results.values():
        assert result.outcome is Outcome.FAILED
        assert "internal error" not in result.message and result.traceback is None
    assert len({r.message for r in results.values()}) == 1


def test_offsets_past_the_end_say_so(tmp_path):
    with pytest.raises(ExportError, match="truncated: tensor data reaches byte"):
        open_export(_hostile(tmp_path, "tensor offset"))


def test_a_huge_string_is_refused_before_it_is_read(tmp_path):
    big = "x" * (reader.MAX_STRING_BYTES + 1)
    target = _gguf_with(tmp_path, lambda w: w.add_string("general.description", big))
    with pytest.raises(ExportError, match=r"declares 16,777,217 bytes \(limit 16,777,216"):
        open_export(target)


def test_a_header_with_too_many_values_is_refused_in_bounded_memory(tmp_path, monkeypatch):
    """The mechanism, at a tenth of a real vocabulary: reading stops at the limit."""
    monkeypatch.setattr(reader, "MAX_HEADER_READS", 20_000)
    target = _gguf_with(tmp_path, lambda w: w.add_array("general.tags", [7] * 100_000))
    tracemalloc.start()
    try:
        with pytest.raises(ExportError, match="more than 20,000 values"):
            open_export(target)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # about 250 bytes per value kept, far below what the 100,000 values would take
    assert peak < 20_000 * 600


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 5500), st.integers(0, 255)), min_size=1,
                      max_size=6),
       cut=st.none() | st.integers(0, 27328))
def test_any_damaged_header_is_a_failed_check_or_a_valid_export(tmp_path, edits, cut):
    data = bytearray(SOURCE.read_bytes())
    for offset, value in edits:
        data[offset] = value
    if cut is not None:
        del data[cut:]
    target = tmp_path / "damaged.gguf"
    target.write_bytes(bytes(data))
    for kind, result in run_export(target).items():
        assert "internal error" not in result.message, (kind, result.message)
        assert "\n" not in result.message


def _opened(target: Path) -> object:
    """What open_export makes of a file: its metadata and tensors, or its one-line refusal."""
    try:
        export = open_export(target)
    except ExportError as exc:
        return str(exc)
    return export.fields, export.tensors


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 5500), st.integers(0, 255)), max_size=4),
       cut=st.none() | st.integers(0, 27328), limit=st.none() | st.integers(1, 1000))
def test_the_array_fast_path_reads_as_ggufs_own_walk(tmp_path, monkeypatch, edits, cut, limit):
    """Arrays are read whole (numbers) or a slice per string, not element by element: the same
    metadata, the same refusals at the same point, for any damaged header and read budget."""
    data = bytearray(SOURCE.read_bytes())
    for offset, value in edits:
        data[offset] = value
    if cut is not None:
        del data[cut:]
    target = tmp_path / "damaged.gguf"
    target.write_bytes(bytes(data))
    if limit is not None:
        monkeypatch.setattr(reader, "MAX_HEADER_READS", limit)
    fast = _opened(target)
    monkeypatch.setattr(reader._Guarded, "_get_field_parts", gguf.GGUFReader._get_field_parts)
    assert _opened(target) == fast


def test_the_read_budget_runs_out_where_ggufs_own_walk_runs_out(monkeypatch):
    """Every budget around the header's size: refused, or read, exactly as gguf's walk."""
    needed = reader._Guarded(SOURCE, SOURCE.stat().st_size)._reads
    for limit in [*range(1, needed, 5), needed - 1, needed, needed + 1]:
        monkeypatch.setattr(reader, "MAX_HEADER_READS", limit)
        fast = _opened(SOURCE)
        with monkeypatch.context() as walk:
            walk.setattr(reader._Guarded, "_get_field_parts", gguf.GGUFReader._get_field_parts)
            assert _opened(SOURCE) == fast, limit
        assert isinstance(fast, str) == (limit < needed)


def test_the_plugin_reports_a_hostile_export_in_one_line(pytester, tmp_path):
    target = _hostile(tmp_path, "array length")
    result = pytester.runpytest(
        "--merged-model", str(export_file("q8_0").parent / "llama" / "merged"),
        "--export", str(target), "--merge-checks", "export", "-p", "no:randomly",
    )
    result.assert_outcomes(failed=5, skipped=1)  # provenance needs a base
    text = result.stdout.str()
    assert "hostile.gguf: a header string at byte 2304 declares 25,769,803,785 bytes" in text
    assert "Traceback" not in text and "internal error" not in text
