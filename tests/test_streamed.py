"""Streamed forward passes: the models' own code, weights read per layer, within a memory budget.

Every architecture the behaviour family supports is run streamed and compared with the same
model loaded whole by transformers (and peft): the outputs must be identical. The budget's
arithmetic, the layers kept between passes, the read-ahead and the refusal are checked on real
models; so is the promise that nothing is written, including when a run is refused or
interrupted in the middle of a pass.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from support.guard import differences, snapshot

from harness.case import MergeCase
from harness.forward.plan import plan_weights
from harness.forward.pool import MemoryRefusal, Pool, activation_bytes
from harness.forward.skeleton import attach_adapter, build_model, slots
from harness.forward.stream import StreamedModel
from harness.io.checkpoint import Checkpoint
from harness.io.models import load_peft, load_pretrained, quiet
from harness.memory import GIB, MIB, default_budget, format_size, parse_size, suggest_size
from harness.run.settings import Settings
from harness.tiny import build_adapter, peft_merge

pytestmark = pytest.mark.usefixtures("one_thread")



def streamed(folder: Path, task: str, pool: Pool, adapter: Path | None = None,
             dtype: torch.dtype = torch.float32, keep: bool = True) -> StreamedModel:
    """``folder``'s model (with ``adapter``) streamed from its checkpoint."""
    plain = build_model(folder, task, dtype=dtype)
    owned = slots(plain)
    checkpoint = Checkpoint.open(folder)
    plan = plan_weights(plain, checkpoint)
    model = plain if adapter is None else attach_adapter(plain, adapter, "cpu")
    return StreamedModel(model, plain, owned, plan, checkpoint, device="cpu", pool=pool,
                         label="test", keep=keep)


def bytes_per_pass(model: StreamedModel) -> int:
    """What one pass reads: each unit's distinct source tensors."""
    total = 0
    for unit in model.units:
        sources = {s for slot in unit.slots for s in model.plan.recipes[slot.name].sources}
        total += sum(model.checkpoint.tensors[s].nbytes for s in sources)
    return total


def batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs):
    with torch.inference_mode():
        return model(**inputs).logits


ARCHITECTURES = [
    ("llama", "F32", "CAUSAL_LM", {}),
    ("mistral", "BF16", "CAUSAL_LM", {}),
    ("qwen2", "BF16", "CAUSAL_LM", {}),  # tied embeddings
    ("gpt2", "F16", "CAUSAL_LM", {}),  # Conv1D
    ("gemma", "BF16", "CAUSAL_LM", {}),
    ("phi3", "F32", "CAUSAL_LM", {}),
    ("bert", "F32", "SEQ_CLS", {}),
    ("llama", "BF16", "CAUSAL_LM", {"use_dora": True}),
    ("llama", "F32", "CAUSAL_LM", {"modules_to_save": ["lm_head"]}),
    ("llama", "F16", "CAUSAL_LM", {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}),
]


@pytest.mark.parametrize(
    ("arch", "dtype", "task", "lora"), ARCHITECTURES,
    ids=[f"{a}-{d}-{t}-{'+'.join(lo) or 'lora'}" for a, d, t, lo in ARCHITECTURES],
)
def test_streamed_outputs_equal_the_whole_model(arch, dtype, task, lora, tiny_merge_factory):
    case = tiny_merge_factory(arch=arch, dtype=dtype, task=task, scale=0.05, **lora)
    inputs = batch()
    # nothing kept between passes: every pass reads every layer again
    pool = Pool("cpu", requested=MIB)
    merged = streamed(case.merged, task, pool, keep=False)
    whole, _ = load_pretrained(case.merged, task, dtype=torch.float32)
    first, second = logits(merged, inputs), logits(merged, inputs)
    assert torch.equal(first, logits(whole, inputs))
    assert torch.equal(first, second)
    units = len(merged.units)
    assert units >= 4  # embedding, layers, and what follows them, each its own unit
    traffic = merged.traffic
    # (a unit read ahead in the first pass may be dropped: that pass learns the call order)
    assert traffic.units_read - traffic.units_dropped == 2 * units and traffic.units_kept == 0
    assert traffic.units_dropped <= 1
    largest = max(u.nbytes for u in merged.units)
    assert 2 * bytes_per_pass(merged) <= traffic.bytes_read <= 2 * bytes_per_pass(merged) + largest
    # the unmerged adapter model: peft's own layers on the streamed base
    adapter = streamed(case.base, task, pool, case.adapter, keep=False)
    head = {"num_labels": 3, "pad_token_id": 0} if task == "SEQ_CLS" else None
    whole_adapter = load_peft(case.base, case.adapter, task, dtype=torch.float32, head=head)
    assert torch.equal(logits(adapter, inputs), logits(whole_adapter, inputs))
    assert type(adapter.model).__name__.startswith("PeftModel")
    # after the passes, no weight is left materialised in the skeletons
    for model in (merged.model, adapter.model):
        assert all(p.device.type == "meta" for n, p in model.named_parameters()
                   if "lora_" not in n and "modules_to_save" not in n)
    assert pool.live == 0


def test_tied_head_is_read_from_the_embedding(tiny_merge_factory):
    case = tiny_merge_factory(arch="qwen2", dtype="BF16", scale=0.05)
    plain = build_model(case.merged, "CAUSAL_LM", dtype=torch.float32)
    checkpoint = Checkpoint.open(case.merged)
    assert "lm_head.weight" not in checkpoint.tensors
    plan = plan_weights(plain, checkpoint)
    assert plan.recipes["lm_head.weight"].sources == ("model.embed_tokens.weight",)
    assert plan.missing == [] and plan.unexpected == []


def _moe_case(root: Path, name: str, config_class: str, kwargs: dict) -> MergeCase:
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**kwargs)
    base = root / name / "base"
    with quiet():
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    adapter = build_adapter(base, root / name / "adapter", scale=0.05,
                            target_modules=["q_proj", "v_proj", "o_proj"])
    return MergeCase(peft_merge(base, adapter, root / name / "merged"), base, adapter)


MOE = {
    "mixtral": ("MixtralConfig", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128)),
}


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_experts_are_fused_by_transformers_own_converter(name, tmp_path):
    """Per-expert tensors on disk, one fused parameter in transformers 5: read per layer."""
    case = _moe_case(tmp_path, name, *MOE[name])
    stored = Checkpoint.open(case.merged).tensors
    assert any(".experts.0." in n for n in stored)  # the per-expert layout, as saved
    plain = build_model(case.merged, "CAUSAL_LM", dtype=torch.float32)
    plan = plan_weights(plain, Checkpoint.open(case.merged))
    fused = [n for n, r in plan.recipes.items() if r.converter is not None]
    assert fused and all(".experts." in n for n in fused)
    assert plan.missing == [] and plan.unexpected == []
    pool = Pool("cpu", requested=GIB)
    inputs = batch()
    whole, _ = load_pretrained(case.merged, "CAUSAL_LM", dtype=torch.float32)
    assert torch.equal(logits(streamed(case.merged, "CAUSAL_LM", pool), inputs),
                       logits(whole, inputs))
    from harness.checks import behaviour
    from harness.run.runner import run_check

    checks = {c.name: c for c in behaviour.checks(Settings())}
    for check in ("loads", "equivalence", "generation"):
        fresh = MergeCase(case.merged, case.base, case.adapter, None, Settings(examples=4))
        try:
            result = run_check(checks[check], fresh.context())
        finally:
            fresh.release()
        assert result.outcome.value == "passed", (check, result.message)


# ---- the budget -------------------------------------------------------------------------------


def test_layers_are_kept_between_passes_within_the_budget(tiny_merge_factory):
    case = tiny_merge_factory(arch="llama", dtype="BF16", scale=0.05)
    inputs = batch()
    roomy = Pool("cpu", requested=64 * MIB)
    model = streamed(case.merged, "CAUSAL_LM", roomy)
    logits(model, inputs)
    logits(model, inputs)
    units = len(model.units)
    # everything fits: read once, then every unit reused from memory
    assert model.traffic.units_read == units and model.traffic.units_kept == units
    assert roomy.used <= roomy.budget and roomy.cached > 0
    # a budget for about three units: some kept, the rest read again, within the budget
    largest = max(u.nbytes for u in model.units)
    tight = Pool("cpu", requested=3 * largest + largest // 2)
    squeezed = streamed(case.merged, "CAUSAL_LM", tight)
    for _ in range(3):
        logits(squeezed, inputs)
        assert tight.cached + tight.working_set() <= tight.budget
    assert 0 < squeezed.traffic.units_kept < 2 * units
    assert squeezed.traffic.units_ahead > 0  # the next unit was read while one ran
    model.release()
    squeezed.release()
    assert roomy.members == {} and roomy.cached == 0 and tight.cached == 0


def test_a_unit_that_cannot_fit_is_refused_with_the_figures(tiny_merge_factory):
    case = tiny_merge_factory(arch="llama", dtype="F32", scale=0.05)
    pool = Pool("cpu", requested=10_000)
    with pytest.raises(MemoryRefusal) as refused:
        streamed(case.merged, "CAUSAL_LM", pool)
    message = str(refused.value)
    from harness.forward.units import partition

    plain = build_model(case.merged, "CAUSAL_LM", dtype=torch.float32)
    biggest = max(partition(plain, slots(plain)), key=lambda u: u.nbytes)
    largest = biggest.nbytes
    assert biggest.name == "model.layers.0" and largest > 128 * 32 * 4  # a layer, not the head
    assert message.startswith(f"test: one unit ({biggest.name}) needs {format_size(largest)}")
    assert f"> {format_size(10_000)} memory budget (--merge-memory)" in message
    assert f"pass --merge-memory {suggest_size(largest * 1.1)} or more" in message
    assert pool.members == {}


def test_budget_arithmetic():
    pool = Pool("cpu", requested=100)
    pool.set_reserve(10)
    owner = object()
    pool.admit(owner, "m", 20, [("a", 30), ("b", 40)], cache=True)
    assert pool.working_set() == 20 + 10 + 2 * 40
    assert pool.floor() == 20 + 10 + 40
    assert pool.take(40) and pool.used == 70
    assert not pool.can_read_ahead(40) and pool.can_read_ahead(30)
    assert not pool.give(owner, "b", {}, 40)  # no room beyond the working set to keep it
    assert pool.used == 30
    other = object()
    with pytest.raises(MemoryRefusal, match="one unit \\(c\\) needs 80 B"):
        pool.admit(other, "n", 0, [("c", 80)], cache=True)
    assert id(other) not in pool.members
    # the derived default grows to the floor (one unit, not two), within the available memory
    assert default_budget("cpu", 3 * GIB) >= min(3 * GIB, default_budget("cpu"))
    assert parse_size("6GiB") == 6 * GIB and parse_size("1.5G") == int(1.5 * GIB)
    assert parse_size("512MB") == 512 * 10**6 and parse_size(4096) == 4096
    for bad in ("six", "-1G", "0", "1 XB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_activation_reserve_grows_with_the_pass():
    config = {"hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32000,
              "num_attention_heads": 32}
    small = activation_bytes(config, 2, 32)
    assert activation_bytes(config, 32, 32) == pytest.approx(16 * small, rel=0.01)
    assert 0.5 * GIB < activation_bytes(config, 32, 32) < 0.7 * GIB  # 1024 tokens of a 7B


def test_gpu_placement_and_budget_arithmetic_on_a_cpu(tiny_merge_factory, monkeypatch):
    """Without a GPU: the device budget comes from the device's free memory, and every
    materialised tensor lands on the model's device (the meta device stands in for one)."""
    import harness.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu", meminfo=None: 8 * GIB)
    assert memory.default_budget("cuda:0") == int(8 * GIB * memory.DEFAULT_SHARE)
    assert memory.default_budget("cpu", 5 * GIB) == 5 * GIB
    assert memory.default_budget("cpu", 50 * GIB) == int(8 * GIB * memory.DEFAULT_SHARE)
    case = tiny_merge_factory(arch="llama", dtype="BF16", scale=0.05)
    pool = Pool("cuda:0", requested=GIB)
    plain = build_model(case.merged, "CAUSAL_LM", dtype=torch.float16)
    model = StreamedModel(plain, plain, slots(plain), plan_weights(plain, Checkpoint.open(
        case.merged)), Checkpoint.open(case.merged), device="meta", pool=pool, label="m")
    made = model._materialise(model.units[1])
    assert made and all(p.device.type == "meta" and p.dtype == torch.float16 for p in made)
    assert all(b.device.type == "meta" for b in plain.buffers())


# ---- nothing written ------------------------------------------------------------------------


class WriteRecorder:
    """Every path opened for writing (or created as a folder) anywhere, during a run."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import builtins
        import io

        real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir
        flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

        def recording_open(file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and any(c in mode for c in "wax+"):
                self.paths.append(os.path.realpath(os.fspath(file)))
            return real_open(file, mode, *args, **kwargs)

        def recording_os_open(path, how, *args, **kwargs):
            if how & flags:
                self.paths.append(os.path.realpath(os.fspath(path)))
            return real_os_open(path, how, *args, **kwargs)

        def recording_mkdir(path, *args, **kwargs):
            self.paths.append(os.path.realpath(os.fspath(path)))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", recording_open)
        monkeypatch.setattr(io, "open", recording_open)
        monkeypatch.setattr(os, "open", recording_os_open)
        monkeypatch.setattr(os, "mkdir", recording_mkdir)

    def outside(self, allowed: Path) -> list[str]:
        """Writes that are not inside ``allowed`` (devices such as /dev/null are no files)."""
        root = os.path.realpath(allowed)
        return [
            p for p in self.paths
            if p != root and not p.startswith(root + os.sep) and not p.startswith("/dev/")
        ]


@pytest.fixture
def private_inputs(tmp_path_factory, tiny_merge_factory) -> dict[str, Path]:
    case = tiny_merge_factory(arch="llama", dtype="BF16", scale=0.05)
    root = tmp_path_factory.mktemp("streamed-inputs")
    return {name: Path(shutil.copytree(getattr(case, name), root / name))
            for name in ("base", "adapter", "merged")}


def _run_behaviour(pytester, inputs, monkeypatch, *extra, **kwargs):
    """The behaviour family in-process, temp files sent to a private folder, writes recorded."""
    temp = pytester.path.parent / f"{pytester.path.name}-tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    before = {name: snapshot(folder) for name, folder in inputs.items()}
    recorder = WriteRecorder()
    with pytest.MonkeyPatch.context() as patch:
        recorder.install(patch)
        result = pytester.runpytest(
            "--merged-model", str(inputs["merged"]), "--base-model", str(inputs["base"]),
            "--adapter", str(inputs["adapter"]), "--merge-checks", "behaviour",
            "--merge-examples", "3", "-p", "no:cacheprovider", "-p", "no:randomly", *extra,
            **kwargs,
        )
    for name, folder in inputs.items():
        assert differences(before[name], snapshot(folder)) == [], name
    assert recorder.outside(temp) == [], recorder.outside(temp)
    assert list(temp.iterdir()) == []  # every private temporary folder was removed
    assert list(pytester.path.iterdir()) == []  # nothing in the run folder
    return result


def test_streamed_run_writes_nothing(pytester, private_inputs, monkeypatch):
    result = _run_behaviour(pytester, private_inputs, monkeypatch, "--merge-memory", "4MiB")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*merge::behaviour::equivalence*on 3 probes*"])


def test_refused_run_writes_nothing(pytester, private_inputs, monkeypatch):
    result = _run_behaviour(pytester, private_inputs, monkeypatch, "--merge-memory", "4KiB",
                            "-rs")
    result.stdout.fnmatch_lines(["*one unit (model.* needs *> 4 KiB memory budget*"])
    assert "passed" not in result.stdout.str().split("merge::behaviour::sidecars")[0]
    # the checks applied and verified nothing: the gate names memory as what they lacked (a
    # full gate fails on it; this partial one lists it)
    result.stdout.fnmatch_lines(["*not verified:", "*merge::behaviour::loads: needs memory"])


def test_interrupted_run_writes_nothing(pytester, private_inputs, monkeypatch):
    """Ctrl-C in the middle of a streamed pass: the run stops, nothing is left anywhere."""
    import harness.forward.stream as stream

    reads = {"count": 0}
    real = stream.read_into

    def interrupted(checkpoint, name, target):
        reads["count"] += 1
        if reads["count"] == 40:
            raise KeyboardInterrupt
        return real(checkpoint, name, target)

    monkeypatch.setattr(stream, "read_into", interrupted)
    result = _run_behaviour(pytester, private_inputs, monkeypatch, "--merge-memory", "4MiB",
                            no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert reads["count"] == 40


# ---- the compute dtype ------------------------------------------------------------------------


def test_compute_dtype_follows_the_cpu(tmp_path, monkeypatch):
    from harness.forward import compute

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 avx512_bf16\n")
    assert {"amx_bf16", "avx512_bf16", "avx512f"} <= compute.cpu_flags(info)
    assert compute.cpu_flags(tmp_path / "absent") is None
    cases = [
        (frozenset({"avx2", "avx512f", "amx_bf16"}), "BF16"),  # Sapphire Rapids and later
        (frozenset({"avx2", "avx512f", "avx512_bf16"}), "BF16"),  # Cooper Lake, Zen 4
        (frozenset({"avx2", "avx512f", "avx512_vnni"}), "F32"),  # Skylake/Ice Lake Xeon
        (frozenset({"avx2"}), "F32"),  # AVX2 only
    ]
    try:
        for flags, expected in cases:
            monkeypatch.setattr(compute, "cpu_flags", lambda cpuinfo=None, flags=flags: flags)
            compute.native_bf16.cache_clear()
            assert compute.default_compute("BF16", "cpu") == expected, flags
            assert compute.default_compute("F16", "cpu") == "F32"
            assert compute.default_compute("F32", "cpu") == "F32"
            assert compute.default_compute("BF16", "cuda:0") == "BF16"
            assert ("no native bf16" in compute.describe_cpu()) is (expected == "F32")
        # unreadable flags: measured once, either way a valid choice
        monkeypatch.setattr(compute, "cpu_flags", lambda cpuinfo=None: None)
        compute.native_bf16.cache_clear()
        assert compute.default_compute("BF16", "cpu") in ("BF16", "F32")
    finally:
        compute.native_bf16.cache_clear()


def test_the_default_budget_holds_one_large_unit_not_two(monkeypatch):
    """A model whose layer is large gets the room it needs for one layer, not for read-ahead:
    the default budget stays 2 GiB (memory flat in model size) and nothing is read ahead."""
    import harness.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu", meminfo=None: 20 * GIB)
    pool = Pool("cpu")
    pool.set_reserve(600 * MIB)
    owner = object()
    layer = 800 * MIB  # a 7B decoder layer in fp32
    pool.admit(owner, "m", 160 * MIB, [("model.layers.0", layer)], cache=True)
    assert pool.working_set() > memory.DEFAULT_CPU_BUDGET
    assert pool.budget == memory.DEFAULT_CPU_BUDGET
    assert pool.take(layer) and not pool.can_read_ahead(layer)
    assert not pool.give(owner, "model.layers.0", {}, layer)  # nothing kept between passes
    # a layer too large for the fixed default raises it to the floor, no further
    big = Pool("cpu")
    big.admit(object(), "n", 0, [("model.layers.0", 3 * GIB)], cache=True)
    assert big.budget == big.floor() == 3 * GIB


def test_memory_kept_for_reuse_stays_within_the_budget(monkeypatch):
    """Released units' memory is kept for the next unit only where the budget has room beyond
    one unit: at the floor it would double what a pass holds."""
    import harness.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu", meminfo=None: 20 * GIB)
    roomy = Pool("cpu", requested=4 * GIB)
    roomy.admit(object(), "m", 100 * MIB, [("model.layers.0", 800 * MIB)], cache=True)
    assert roomy.recycler.limit == 800 * MIB  # the read-ahead slot: one unit's memory reused
    tight = Pool("cpu")
    tight.set_reserve(600 * MIB)
    tight.admit(object(), "m", 160 * MIB, [("model.layers.0", 800 * MIB)], cache=True)
    room = tight.budget - tight.floor()
    assert 0 <= tight.recycler.limit == room < 800 * MIB
    layer = torch.empty(room // 4 + 1, dtype=torch.float32)  # one byte-group over the room
    tight.recycler.give(layer)
    assert tight.recycler.held == 0
    assert tight.used + tight.recycler.held + 800 * MIB <= tight.budget


def test_focus_gives_one_model_the_room_for_its_many_passes():
    pool = Pool("cpu", requested=1000)
    pool.set_reserve(400)
    decoder, other = object(), object()
    pool.admit(decoder, "m", 0, [("layer", 100)], cache=True)
    pool.admit(other, "r", 0, [("layer", 100)], cache=True)
    for name in ("a", "b", "c", "d"):
        assert pool.take(100) and pool.give(other, name, {}, 100)
    # the other model's kept layers fill the room (1000 - 400 - 2 x 100): none for the decoder
    assert pool.cached == 400 and pool.take(100) and not pool.give(decoder, "x", {}, 100)
    with pool.focus(decoder):
        assert pool.cached == 0 and pool.reserve == 400
        for name in ("a", "b", "c", "d"):
            assert pool.take(100) and pool.give(decoder, name, {}, 100)
        assert pool.cached == 400 and pool.used <= pool.budget
    assert pool.used <= pool.budget
