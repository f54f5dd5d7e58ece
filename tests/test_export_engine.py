"""The export engine's parts against their references: gguf.quants, the converter's permutation,
the retention statistics, the config readers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness.export import encoding, matching
from harness.export.layout import Source
from harness.export.parameters import rope_parameters
from harness.export.provenance import Retention, judge
from harness.export.reader import open_export
from harness.export.values import _permute, _source_row
from tests.export_cases import TYPES, export_file

Q = gguf.GGMLQuantizationType
QUICK = (Q.F32, Q.F16, Q.BF16, Q.Q8_0)

finite = st.floats(-1e4, 1e4, width=32, allow_subnormal=True)
blocks = hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.just(64)), elements=finite)


def _ties(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Q8_0 blocks whose every scaled value is an exact .5 tie (max 127 -> scale 1)."""
    values = rng.integers(-126, 126, size=(rows, 64)).astype(np.float32) + np.float32(0.5)
    values[:, 0] = 127.0
    values[:, 32] = -127.0
    return values


def quick(values: np.ndarray, stored: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The quick comparison on numpy arrays, as per-block flags (all False: confirmed)."""
    wide = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    found = matching.mismatches(wide, torch.from_numpy(stored), qtype)
    blocks = stored.size // encoding.type_size(qtype)
    return np.zeros(blocks, dtype=bool) if found is None else found.numpy()


@settings(max_examples=60, deadline=None)
@given(values=blocks, qtype=st.sampled_from(QUICK), seed=st.integers(0, 2**32 - 1))
def test_the_quick_path_only_confirms_what_gguf_quants_encodes(values, qtype, seed):
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:
        values = _ties(rng, values.shape[0])
    if seed % 5 == 0:
        values[:, :32] = 0.0  # a zero block: scale 0
    if qtype == Q.F16 and seed % 2:
        values = values.astype(np.float16)
    reference = encoding.encode(values, qtype)
    assert not quick(values, reference, qtype).any()
    damaged = reference.copy()
    flat = damaged.reshape(-1)
    for position in rng.integers(0, flat.size, size=3):
        flat[position] ^= np.uint8(1 << int(rng.integers(0, 8)))
    size = encoding.type_size(qtype)
    truth = (damaged.reshape(-1, size) != reference.reshape(-1, size)).any(axis=1)
    found = quick(values, damaged, qtype)
    # never "the same" for a block whose bytes differ from gguf.quants' encoding
    assert not (truth & ~found).any()


def _adversarial_blocks(rng: np.random.Generator, exponent: int, rows: int) -> np.ndarray:
    """Q8_0 blocks at scale ``2^exponent``: exact .5 ties, zeros, neighbours of ties, and one
    element of magnitude 127 x scale per block (so that ``x * id`` lands on them exactly)."""
    scale = np.float32(2.0) ** np.float32(exponent) if exponent > -150 else np.float32(0)
    steps = rng.integers(-126, 127, size=(rows, 64)).astype(np.float32)
    kind = rng.integers(0, 4, size=(rows, 64))
    steps = np.where(kind == 0, steps + np.float32(0.5), steps)  # ties
    below = np.nextafter(steps + np.float32(0.5), np.float32(-1e9), dtype=np.float32)
    steps = np.where(kind == 1, below, steps)  # just short of a tie
    steps = np.where(kind == 2, np.float32(0.0), steps)
    steps[:, 0], steps[:, 32] = 127.0, -127.0
    with np.errstate(over="ignore", under="ignore"):
        return (steps * scale).astype(np.float32)


def _decidable(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Per block, whether the quick path must decide it (not leave it to gguf.quants): finite
    values, and for Q8_0 a float32 scale that is zero or normal."""
    blocks = values.reshape(-1, encoding.block_size(qtype)).astype(np.float32)
    finite = np.isfinite(blocks).all(axis=1)
    if qtype != Q.Q8_0:
        return finite
    with np.errstate(all="ignore"):
        scale = np.abs(blocks).max(axis=1) / np.float32(127)
    return finite & ((scale == 0) | (scale >= np.finfo(np.float32).tiny))


def _contract(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    """The quick path confirms every decidable block of gguf.quants' own bytes, and flags every
    block that differs from them: bit flips, and quants rounded half to even at ties (what
    another quantizer would write)."""
    with np.errstate(all="ignore"):
        reference = encoding.encode(values, qtype)
    assert not (quick(values, reference, qtype) & _decidable(values, qtype)).any()
    size = encoding.type_size(qtype)
    variants = []
    flipped = reference.copy().reshape(-1)
    flipped[:: max(1, flipped.size // 5)] ^= np.uint8(0x10)
    variants.append(flipped.reshape(reference.shape))
    if qtype in (Q.F16, Q.BF16):
        # torch's own narrowing: a NaN comes out with other bits than ggml's
        narrow = torch.float16 if qtype == Q.F16 else torch.bfloat16
        wide = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        variants.append(wide.to(narrow).view(torch.uint8).numpy().reshape(reference.shape))
    if qtype == Q.Q8_0:
        blocks = values.reshape(-1, 32)
        with np.errstate(all="ignore"):
            scale = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
            inverse = np.where(scale == 0, np.float32(0), np.float32(1) / scale)
            even = np.rint(blocks * inverse)
        even = np.where(np.isfinite(even), even, 0).clip(-127, 127)
        other = reference.reshape(-1, 34).copy()
        other[:, 2:] = even.astype(np.int8).view(np.uint8)
        variants.append(other.reshape(reference.shape))
    for stored in variants:
        truth = (stored.reshape(-1, size) != reference.reshape(-1, size)).any(axis=1)
        # never "the same" for a block whose bytes differ from gguf.quants' encoding
        assert not (truth & ~quick(values, stored, qtype)).any()


@pytest.mark.parametrize("exponent", [-150, -149, -140, -133, -127, -126, -120, -24, -16, -14,
                                      -8, 0, 8, 9, 100, 120, 121])
def test_the_quick_path_on_adversarial_blocks(exponent):
    """Ties, zero blocks, subnormal and overflowing float16 scales, float32 scales that are
    subnormal (their blocks are left to gguf.quants), values near float32's maximum."""
    rng = np.random.default_rng(exponent + 1000)
    values = _adversarial_blocks(rng, exponent, 6)
    for qtype in QUICK:
        _contract(values, qtype)


@settings(max_examples=80, deadline=None)
@given(exponent=st.integers(-150, 121), seed=st.integers(0, 2**32 - 1))
def test_the_quick_path_agrees_with_gguf_quants_at_every_scale(exponent, seed):
    rng = np.random.default_rng(seed)
    values = _adversarial_blocks(rng, exponent, 2)
    if seed % 7 == 0:
        values[0, 3] = np.float32(np.nan) if seed % 2 else np.float32(np.inf)
    for qtype in QUICK:
        _contract(values, qtype)


@pytest.mark.parametrize("qtype", QUICK, ids=lambda q: q.name)
def test_every_single_damaged_byte_is_flagged(qtype):
    """Each byte of an encoding, changed in any of three ways, is flagged in its own block,
    and the undamaged blocks are still confirmed."""
    rng = np.random.default_rng(7)
    values = _ties(rng, 2)
    values[1] = rng.standard_normal(64).astype(np.float32)
    reference = encoding.encode(values, qtype)
    size = encoding.type_size(qtype)
    for position in range(reference.size):
        for change in (0x01, 0x80, 0xFF):
            damaged = reference.copy()
            damaged.reshape(-1)[position] ^= np.uint8(change)
            flags = quick(values, damaged, qtype)
            assert list(np.flatnonzero(flags)) == [position // size], (position, change)


def test_a_file_rounded_half_to_even_is_not_confirmed():
    """gguf.quants rounds Q8_0 quants half away from zero: 2.5 is 3, -4.5 is -5."""
    values = np.zeros((1, 32), dtype=np.float32)
    values[0, :4] = [127.0, 2.5, -4.5, 0.5]
    reference = encoding.encode(values, Q.Q8_0)
    assert list(reference.view(np.int8)[0, 2:6]) == [127, 3, -5, 1]
    assert not quick(values, reference, Q.Q8_0).any()
    for position, even in ((3, 2), (4, -4), (5, 0)):
        other = reference.copy()
        other.view(np.int8)[0, position] = even
        assert quick(values, other, Q.Q8_0).all()


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16], ids=lambda q: q.name)
@pytest.mark.parametrize("bits", [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA00000,
                                  0x7FFFFFFF, 0xFFFFFFFF, 0x7FC12345], ids=hex)
def test_a_nan_is_never_confirmed_whatever_bytes_hold_it(qtype, bits):
    """gguf.quants keeps a NaN's sign and payload, torch narrows it to a NaN of its own: the
    quick path leaves every NaN to gguf.quants, whether the file holds ggml's NaN, torch's,
    or another one, and still confirms the elements around it."""
    values = np.ones((2, 64), dtype=np.float32)
    values.view(np.uint32)[0, 5] = bits
    values.view(np.uint32)[1, 63] = bits  # the last element: torch's scalar tail, not SIMD
    narrow = torch.float16 if qtype == Q.F16 else torch.bfloat16
    reference = encoding.encode(values, qtype)
    torch_bytes = torch.from_numpy(values).to(narrow).view(torch.uint8).numpy().reshape(2, -1)
    canonical = reference.copy()
    canonical.view(np.uint16)[0, 5] = 0x7E00 if qtype == Q.F16 else 0x7FC0
    for stored in (reference, torch_bytes, canonical):
        assert list(np.flatnonzero(quick(values, stored, qtype))) == [5, 127]


def test_undecided_blocks_are_flagged_not_confirmed():
    """Blocks whose float32 scale is subnormal, infinite or NaN are left to gguf.quants."""
    values = np.zeros((4, 32), dtype=np.float32)
    values[0, 0] = np.float32(1e-37)  # max|x| / 127 is subnormal
    values[1, 0] = np.float32(np.inf)
    values[2, 0] = np.float32(np.nan)
    values[3, :] = np.float32(0.25)  # an ordinary block
    with np.errstate(all="ignore"):
        reference = encoding.encode(values, Q.Q8_0)
    assert list(quick(values, reference, Q.Q8_0)) == [True, True, True, False]


QUANTIZABLE = [t for t in Q if t not in encoding.PLAIN and encoding.reproducible(t)
               and encoding.decodable(t) and encoding.block_size(t) <= 64]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
@settings(max_examples=30, deadline=None)
@given(values=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.just(256)),
                         elements=st.floats(-100, 100, width=32)))
def test_the_error_bound_holds_for_every_type_gguf_can_round_trip(qtype, values):
    decoded = encoding.decode(encoding.encode(values, qtype), qtype)
    block = encoding.block_size(qtype)
    error = np.abs(decoded - values).reshape(-1, block).max(axis=1)
    assert (error <= encoding.error_bound(values, qtype)).all()


def test_reproducible_types_include_what_the_converter_writes():
    for qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_1):
        assert encoding.reproducible(qtype)
    for qtype in (Q.Q4_K, Q.Q6_K, Q.IQ2_XXS):
        assert not encoding.reproducible(qtype) and encoding.decodable(qtype)


# ---- the converter's permutation -------------------------------------------------------------


def converter_permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """``LlamaModel.permute`` of convert_hf_to_gguf.py, as it reads."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@given(heads=st.integers(1, 8), half=st.integers(1, 8), cols=st.integers(1, 5),
       chunk_heads=st.integers(1, 8))
def test_permuting_whole_heads_in_chunks_is_the_converters_permutation(heads, half, cols,
                                                                       chunk_heads):
    rows = heads * 2 * half
    weights = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    expected = converter_permute(weights, heads)
    step = min(chunk_heads, heads) * 2 * half
    pieces = [_permute(weights[s:s + step], 2 * half).reshape(-1, cols)
              for s in range(0, rows, step)]
    assert torch.equal(torch.cat(pieces), expected)
    source = Source("blk.0.attn_q.weight", ("q",), head_rows=2 * half)
    for row in range(rows):
        _, origin = _source_row(source, rows, row)
        assert torch.equal(expected[row], weights[origin])


def test_a_bias_is_permuted_along_its_elements():
    bias = torch.arange(16, dtype=torch.float32)
    expected = converter_permute(bias, 2)
    assert torch.equal(_permute(bias.reshape(1, -1), 8).reshape(-1), expected)


# ---- the retention statistics ---------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(ratio=st.sampled_from([0.0, 0.5, 1.0, 2.0]), noise=st.floats(0.0, 0.5),
       seed=st.integers(0, 2**32 - 1))
def test_the_retention_interval_covers_the_true_ratio(ratio, noise, seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(20_000).astype(np.float32)
    delta = (rng.standard_normal(20_000) * 0.1).astype(np.float32)
    merged = base + delta
    export = base + np.float32(ratio) * delta + (rng.standard_normal(20_000) * noise * 0.1)
    retention = Retention()
    for part in range(4):  # streamed in chunks, as the value pass does
        piece = slice(part * 5000, (part + 1) * 5000)
        retention.add((export - merged)[piece].astype(np.float32), (merged - base)[piece])
    interval = retention.interval(0.999)
    assert interval.low - 1e-4 <= ratio <= interval.high + 1e-4


def test_an_exact_export_has_a_zero_width_interval_at_one():
    retention = Retention()
    delta = np.linspace(-1, 1, 1000, dtype=np.float32)
    retention.add(np.zeros_like(delta), delta)
    interval = retention.interval()
    assert (interval.estimate, interval.low, interval.high) == (1.0, 1.0, 1.0)


def test_judge_names_a_partial_merge_and_ignores_one_damaged_tensor():
    rng = np.random.default_rng(0)
    delta = (rng.standard_normal(4096) * 0.1).astype(np.float32)

    def retention(ratio: float, damage: float = 0.0) -> Retention:
        found = Retention()
        u = (ratio - 1.0) * delta + rng.standard_normal(4096).astype(np.float32) * 1e-3
        u[7] += damage
        found.add(u.astype(np.float32), delta)
        return found

    faithful = judge({"a": retention(1.0), "b": retention(1.0), "c": retention(1.0, 50.0)})
    assert faithful.verdict == 1.0 and faithful.undecided == ["c"]
    partial = judge({"a": retention(1.0), "b": retention(0.0)})
    assert partial.mixed and partial.targets == {1.0: ["a"], 0.0: ["b"]}
    assert judge({"a": retention(2.0)}).verdict == 2.0


# ---- readers ------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype", TYPES)
def test_the_guarded_reader_reads_what_gguf_reads(outtype):
    path = export_file(outtype)
    plain = gguf.GGUFReader(path)
    guarded = open_export(path)
    assert guarded.fields == {k: f.contents() for k, f in plain.fields.items()
                              if not k.startswith("GGUF.")}
    for tensor in plain.tensors:
        found = guarded.tensors[tensor.name]
        assert (found.start, found.nbytes, found.type) == (
            tensor.data_offset, tensor.n_bytes, tensor.tensor_type)
        assert found.shape == tuple(reversed(tensor.shape.tolist()))


@pytest.mark.parametrize(("config", "theta", "kind"), [
    ({"rope_theta": 500000.0}, 500000.0, None),  # transformers 4
    ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}, 10000.0, "default"),
    ({"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4.0}}, 1e6, "linear"),
])
def test_rope_settings_are_read_from_either_config_style(config, theta, kind):
    params = rope_parameters(config)
    assert params["rope_theta"] == theta and params.get("rope_type") == kind
