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

from harness.export import encoding
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
    quick = encoding.quick_differs(values, reference, qtype)
    assert quick is not None and not quick.any()
    damaged = reference.copy()
    flat = damaged.reshape(-1)
    for position in rng.integers(0, flat.size, size=3):
        flat[position] ^= np.uint8(1 << int(rng.integers(0, 8)))
    size = encoding.type_size(qtype)
    truth = (damaged.reshape(-1, size) != reference.reshape(-1, size)).any(axis=1)
    found = encoding.quick_differs(values, damaged, qtype)
    assert found is not None
    # never "the same" for a block whose bytes differ from gguf.quants' encoding
    assert not (truth & ~found).any()


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
    pieces = [_permute(weights[s:s + step], 2 * half) for s in range(0, rows, step)]
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
