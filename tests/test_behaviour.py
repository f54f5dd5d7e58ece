"""Behaviour checks: no false alarm on correct merges, deliberate faults caught, plugin runs.

Every merge here is real (tiny random models, real peft adapters and merges, safetensors on
disk); faults are injected by rewriting a copy of a merged checkpoint's safetensors files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file, save_file
from support.faults import DTYPE_ROTATION, FAULTS, inject, retie

from harness.behaviour.batch import outputs
from harness.behaviour.measure import C_MAX
from harness.behaviour.models import adapter_model, built_models, setup, twin_model
from harness.case import MergeCase
from harness.checks import behaviour
from harness.run.result import CheckResult, Outcome
from harness.run.runner import run_check
from harness.run.settings import Settings
from harness.strategies import merge_cases

pytestmark = pytest.mark.usefixtures("one_thread")

#: Correct merges the main property checks (the done-when asks for at least 200 in total).
CORRECT_MERGES = 200
#: Probes per correct merge (each probe is a batch of up to 2 x 32 tokens).
PROBES_PER_MERGE = 3
CHECKS = {c.name: c for c in behaviour.checks(Settings())}


def run(name: str, case: MergeCase, **options: object) -> CheckResult:
    """Run one behaviour check on a fresh context of ``case`` and free its models."""
    fresh = MergeCase(case.merged, case.base, case.adapter, case.spec, Settings(**options))
    try:
        return run_check(CHECKS[name], fresh.context())
    finally:
        fresh.release()


def explain(result: CheckResult) -> str:
    return "\n".join([result.message, *result.details, str(result.metrics.get("traceback", ""))])


# ---- zero false alarms -------------------------------------------------------------------


@pytest.mark.slow
@settings(
    max_examples=CORRECT_MERGES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    spec=merge_cases(
        architectures=("llama", "qwen2", "gpt2", "mistral"),
        dtypes=("F32", "BF16", "F16"),
        methods=("peft", "harness"),
        seeds=(0,),
    )
)
def test_correct_merges_pass_equivalence(spec, tiny_merge_factory):
    case = tiny_merge_factory(spec)
    result = run("equivalence", case, examples=PROBES_PER_MERGE)
    assert result.outcome is Outcome.PASSED, f"false alarm on {spec.key()}:\n{explain(result)}"


@pytest.mark.parametrize(
    ("arch", "dtype", "lora"),
    [
        ("llama", "F32", {"use_dora": True}),
        ("qwen2", "BF16", {"use_rslora": True, "rank_pattern": {"q_proj": 8}}),
        ("gpt2", "F16", {"fan_in_fan_out": True}),
        ("mistral", "BF16", {"modules_to_save": ["lm_head"]}),
        ("llama", "F16", {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}),
        ("gemma", "BF16", {}),
        ("phi3", "F32", {}),
    ],
)
def test_correct_merges_pass_every_behaviour_check(arch, dtype, lora, tiny_merge_factory):
    case = tiny_merge_factory(arch=arch, dtype=dtype, scale=0.05, **lora)
    for name in ("loads", "equivalence", "generation", "sidecars"):
        result = run(name, case, examples=5)
        assert result.outcome is Outcome.PASSED, f"{name}: {explain(result)}"


def test_fp32_is_tight(tiny_merge_factory):
    case = tiny_merge_factory(arch="llama", dtype="F32", scale=0.05)
    result = run("equivalence", case, examples=5)
    assert result.outcome is Outcome.PASSED
    relative = result.metrics["merged_max_abs"] / result.metrics["tolerance"]["noise_max"]
    setup = result.metrics["setup"]
    assert setup["reference"] == "F64"
    # the fp32 merge deviates from the float64 reference by rounding noise only
    assert result.metrics["merged_max_abs"] < 1e-4, explain(result)
    assert relative < C_MAX


# ---- deliberate faults ---------------------------------------------------------------------

FAULT_MATRIX = [
    (fault, arch, DTYPE_ROTATION[(i + j) % 3])
    for i, fault in enumerate(FAULTS)
    for j, arch in enumerate(("llama", "qwen2", "gpt2", "mistral"))
]


@pytest.mark.parametrize(("fault", "arch", "dtype"), FAULT_MATRIX)
def test_fault_is_caught_by_behaviour_alone(fault, arch, dtype, tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch=arch, dtype=dtype, scale=0.05, target_modules="all-linear")
    faulty = MergeCase(
        inject(case.merged, case.base, fault, tmp_path / "faulty"), case.base, case.adapter
    )
    result = run("equivalence", faulty, examples=10)
    assert result.outcome is Outcome.FAILED, explain(result)
    assert "minimal failing input" in result.details[0]
    minimal = result.metrics["minimal_input"]
    # shrunk: a single short row is enough to show a fault that changes every layer's output
    assert len(minimal["input_ids"]) == 1
    assert len(minimal["input_ids"][0]) <= 3, explain(result)


@pytest.mark.parametrize(
    ("dtype", "lora"),
    [
        ("F32", {"modules_to_save": ["lm_head"]}),
        ("BF16", {"target_modules": ["lm_head", "q_proj", "v_proj"]}),
    ],
)
def test_retied_embeddings_config_is_caught(dtype, lora, tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="llama", dtype=dtype, scale=0.05, **lora)
    faulty = MergeCase(retie(case.merged, tmp_path / "retied"), case.base, case.adapter)
    assert run("loads", faulty).outcome is Outcome.PASSED  # loads fine: the fault is silent
    result = run("equivalence", faulty, examples=10)
    assert result.outcome is Outcome.FAILED, explain(result)
    generation = run("generation", faulty)
    assert generation.outcome is Outcome.FAILED, explain(generation)
    assert "diverges" in generation.message


def test_generation_reports_first_divergence(tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="llama", dtype="F32", scale=0.05)
    good = run("generation", case)
    assert good.outcome is Outcome.PASSED
    assert "identical on 3 of 3 prompts" in good.message, explain(good)
    faulty = MergeCase(
        inject(case.merged, case.base, "sign", tmp_path / "sign"), case.base, case.adapter
    )
    bad = run("generation", faulty)
    assert bad.outcome is Outcome.FAILED
    assert "prompt 1 token" in bad.message and "not a rounding tie" in bad.message


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        # default on a CPU: fp32 compute, A is the reference, floor from the bf16-rounded twin
        (None, {"compare": "F32", "adapter": "F32", "reference": "F32"}),
        # --merge-dtype BF16: compute as stored, A in bf16 against an fp32 reference
        ("BF16", {"compare": "BF16", "adapter": "BF16", "reference": "F32"}),
    ],
)
def test_merge_dtype_picks_the_comparison(dtype, expected, tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="qwen2", dtype="BF16", scale=0.05)
    result = run("equivalence", case, examples=5, dtype=dtype)
    assert result.outcome is Outcome.PASSED, explain(result)
    setup = result.metrics["setup"]
    assert setup == {"task": "CAUSAL_LM", "stored": "BF16", "device": "cpu", **expected}
    source = result.metrics["tolerance"]["source"]
    assert "(the twin)" in source
    # in an upcast comparison A is the reference: only the twin has a noise to measure
    assert ("adapter model" in source) is (dtype is not None), explain(result)
    faulty = MergeCase(
        inject(case.merged, case.base, "scale", tmp_path / "scale"), case.base, case.adapter
    )
    assert run("equivalence", faulty, examples=10, dtype=dtype).outcome is Outcome.FAILED


def test_upcast_floor_is_the_storage_rounding(tiny_merge_factory):
    """In fp32 compute of a bf16 merge, the floor is the twin's deviation: far below bf16 compute
    noise, and a correct merge sits near it (it is such a merge)."""
    case = tiny_merge_factory(arch="llama", dtype="BF16", scale=0.05)
    upcast = run("equivalence", case, examples=5)
    native = run("equivalence", case, examples=5, dtype="BF16")
    assert upcast.outcome is Outcome.PASSED and native.outcome is Outcome.PASSED
    floor = upcast.metrics["tolerance"]["noise_max"]
    assert 0 < floor < native.metrics["tolerance"]["noise_max"], explain(upcast)
    assert upcast.metrics["adapter_max_abs"] == 0  # A is the reference
    assert upcast.metrics["merged_max_abs"] <= C_MAX * floor, explain(upcast)


# ---- other model classes ---------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "dtype"), [("bert", "F32"), ("llama", "BF16")])
def test_sequence_classification(arch, dtype, tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch=arch, dtype=dtype, task="SEQ_CLS", scale=0.05)
    loads = run("loads", case)
    assert loads.outcome is Outcome.PASSED and "ForSequenceClassification" in loads.message
    assert run("equivalence", case, examples=5).outcome is Outcome.PASSED
    generation = run("generation", case)
    assert generation.outcome is Outcome.SKIPPED and "SEQ_CLS" in generation.message
    faulty = MergeCase(
        inject(case.merged, case.base, "sign", tmp_path / "sign"), case.base, case.adapter
    )
    assert run("equivalence", faulty, examples=10).outcome is Outcome.FAILED


def test_missing_head_is_a_random_init(tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="bert", task="SEQ_CLS")
    broken = tmp_path / "headless"
    shutil.copytree(case.merged, broken)
    tensors = load_file(broken / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}
    save_file(kept, broken / "model.safetensors", metadata={"format": "pt"})
    result = run("loads", MergeCase(broken))
    assert result.outcome is Outcome.FAILED
    assert "randomly" in result.message and "classifier.weight" in result.message


# ---- merged alone, refusals, non-finite outputs ------------------------------------------------


def test_merged_alone_runs_loads_and_skips_the_comparisons(tiny_merge_factory):
    case = tiny_merge_factory(arch="gpt2", dtype="F16")
    alone = MergeCase(case.merged)
    assert run("loads", alone).outcome is Outcome.PASSED
    for name in ("equivalence", "generation"):
        result = run(name, alone)
        assert result.outcome is Outcome.SKIPPED
        assert "--base-model and --adapter" in result.message
    assert run("sidecars", alone).outcome is Outcome.SKIPPED


def test_remote_code_config_is_refused(tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="llama")
    custom = tmp_path / "custom"
    shutil.copytree(case.merged, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    result = run("loads", MergeCase(custom))
    assert result.outcome is Outcome.FAILED
    assert "auto_map" in result.message and "--merge-trust-remote-code" in result.message
    assert "\n" not in result.message


def test_nonfinite_outputs_fail_loads(tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="llama", dtype="F16")
    broken = tmp_path / "overflow"
    shutil.copytree(case.merged, broken)
    tensors = load_file(broken / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = torch.full_like(tensors[name], 60000.0)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    for dtype in (None, "F16"):  # fp32 compute checks fp16's range on one row too
        result = run("loads", MergeCase(broken, case.base, case.adapter), dtype=dtype)
        assert result.outcome is Outcome.FAILED and "non-finite" in result.message
        assert "overflow in F16" in result.message, explain(result)


def test_missing_libraries_skip(monkeypatch, tiny_merge_factory):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    case = tiny_merge_factory(arch="llama")
    result = run("equivalence", case)
    assert result.outcome is Outcome.SKIPPED and "peft not installed" in result.message


# ---- sidecars ----------------------------------------------------------------------------------


def _copy(case: MergeCase, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(case.merged, target)
    return target


def test_sidecar_difference_is_a_warning_with_the_diff(tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="llama")
    changed = _copy(case, tmp_path, "changed")
    generation = json.loads((changed / "generation_config.json").read_text())
    generation.update(do_sample=True, temperature=0.7)
    (changed / "generation_config.json").write_text(json.dumps(generation))
    (changed / "tokenizer.json").unlink()
    result = run("sidecars", MergeCase(changed, case.base, case.adapter))
    assert result.outcome is Outcome.WARNING
    assert "missing from the merge: tokenizer.json" in result.message
    assert "differ: generation_config.json" in result.message
    assert "generation_config.json: do_sample: (absent) -> true" in result.message
    assert any("temperature: (absent) -> 0.7" in line for line in result.details)


def test_sidecars_prefer_the_adapters_tokenizer(tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(case.adapter, adapter)
    config = json.loads((case.base / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages }}"
    (adapter / "tokenizer_config.json").write_text(json.dumps(config))
    stale = run("sidecars", MergeCase(case.merged, case.base, adapter))
    assert stale.outcome is Outcome.WARNING and "tokenizer_config.json" in stale.message
    fresh = _copy(case, tmp_path, "fresh")
    shutil.copyfile(adapter / "tokenizer_config.json", fresh / "tokenizer_config.json")
    assert run("sidecars", MergeCase(fresh, case.base, adapter)).outcome is Outcome.PASSED


# ---- through pytest ------------------------------------------------------------------------


def test_plugin_behaviour_only_good_and_faulty(pytester, tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="llama", dtype="BF16", scale=0.05)
    args = [
        "--base-model",
        str(case.base),
        "--adapter",
        str(case.adapter),
        "--merge-checks",
        "behaviour",
        "--merge-examples",
        "8",
        "-p",
        "no:randomly",
    ]
    good = pytester.runpytest("--merged-model", str(case.merged), *args)
    assert good.ret == 0, good.stdout.str()
    good.stdout.fnmatch_lines(["*merge::behaviour::equivalence*on 8 probes*", "*5 passed*"])
    faulty = inject(case.merged, case.base, "sign", tmp_path / "faulty")
    bad = pytester.runpytest("--merged-model", str(faulty), *args)
    assert bad.ret == 1, bad.stdout.str()
    bad.stdout.fnmatch_lines(
        [
            "*merged model deviates from the F32 reference*",
            "*minimal failing input: batch 1 x length *",
        ]
    )
    bad.stdout.fnmatch_lines(["FAIL merge::behaviour::layers*further from the F32 reference*"])


def test_sidecar_warning_passes_with_a_pytest_warning(pytester, tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="llama", dtype="BF16", scale=0.05)
    changed = _copy(case, tmp_path, "changed")
    generation = json.loads((changed / "generation_config.json").read_text())
    generation["do_sample"] = True
    (changed / "generation_config.json").write_text(json.dumps(generation))
    result = pytester.runpytest(
        "--merged-model",
        str(changed),
        "--base-model",
        str(case.base),
        "--adapter",
        str(case.adapter),
        "--merge-checks",
        "behaviour",
        "--merge-examples",
        "3",
        "-p",
        "no:randomly",
        "-k",
        "sidecars",
    )
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*MergeHarnessWarning: merge::behaviour::sidecars: sidecar files differ:"
            " generation_config.json (generation_config.json: do_sample: (absent) -> true)*",
        ]
    )


def test_search_is_deterministic(tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="gpt2", dtype="BF16", scale=0.05)
    faulty = MergeCase(
        inject(case.merged, case.base, "layer", tmp_path / "layer"), case.base, case.adapter
    )
    first, second = (run("equivalence", faulty, examples=10) for _ in range(2))
    assert first.outcome is second.outcome is Outcome.FAILED
    assert first.message == second.message
    assert first.metrics["minimal_input"] == second.metrics["minimal_input"]
    good = [run("equivalence", case, examples=6).metrics for _ in range(2)]
    assert good[0]["worst_ratio"] == good[1]["worst_ratio"]
    assert good[0]["merged_max_abs"] == good[1]["merged_max_abs"]


def test_config_without_vocabulary_is_a_one_line_failure(tiny_merge_factory, tmp_path):
    case = tiny_merge_factory(arch="llama")
    broken = _copy(case, tmp_path, "novocab")
    config = json.loads((broken / "config.json").read_text())
    del config["vocab_size"]
    (broken / "config.json").write_text(json.dumps(config))
    result = run("equivalence", MergeCase(broken, case.base, case.adapter))
    assert result.outcome is Outcome.FAILED
    assert result.message.endswith("config.json: config.json has no vocab_size")
    assert "internal error" not in result.message


def test_models_that_cannot_fit_are_refused_before_reading(tiny_merge_factory):
    # the tiny models fit anywhere: give a budget smaller than one of their layers
    case = tiny_merge_factory(arch="llama", dtype="BF16")
    fresh = MergeCase(case.merged, case.base, case.adapter, None, Settings(memory=4096))
    try:
        ctx = fresh.context()
        for name in ("loads", "equivalence", "generation"):
            result = run_check(CHECKS[name], ctx)
            assert result.outcome is Outcome.SKIPPED, explain(result)
            assert result.message.startswith("the merged model: one unit (model."), result.message
            assert "> 4 KiB memory budget (--merge-memory)" in result.message, result.message
            assert "pass --merge-memory" in result.message and "\n" not in result.message
        # nothing was read: the refusal comes from the shapes, before any layer
        assert built_models(ctx) == []
    finally:
        fresh.release()


def test_available_memory_reads_the_kernel_figure(tmp_path):
    from harness.memory import GIB, available_bytes, shortfall

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    2097152 kB\n")
    assert available_bytes("cpu", meminfo) == 2 * GIB
    assert available_bytes("cpu", tmp_path / "absent") is None
    real = available_bytes("cpu")
    assert real is None or real > 0
    assert shortfall(1, "cpu") is None
    assert "needs about" in (shortfall(1 << 60, "cpu", "x") or "needs about")


@pytest.mark.parametrize("lora", [{}, {"use_dora": True}, {"fan_in_fan_out": True}])
def test_twin_is_a_correct_merge_and_leaves_the_adapter_model_alone(lora, tiny_merge_factory):
    import copy

    from harness.io.models import load_peft

    arch = "gpt2" if lora.get("fan_in_fan_out") else "llama"
    case = tiny_merge_factory(arch=arch, dtype="F32", scale=0.05, **lora)
    fresh = MergeCase(case.merged, case.base, case.adapter)
    try:
        ctx = fresh.context()
        s = setup(ctx)
        probe = s.space.calibration_probe()
        before = outputs(adapter_model(ctx), probe, s.task, s.space)
        twin = outputs(twin_model(ctx), probe, s.task, s.space)
        after = outputs(adapter_model(ctx), probe, s.task, s.space)
        assert torch.equal(before, after)  # A untouched by the twin's merges
        # the per-layer merge is peft's whole-model merge up to fp32 rounding of the sum
        whole = load_peft(case.base, case.adapter, "CAUSAL_LM", dtype=torch.float32)
        merged = copy.deepcopy(whole).merge_and_unload()
        with torch.no_grad():
            tensors = probe.tensors()
            expected = merged(**tensors).logits[tensors["attention_mask"].bool()].double()
            unmerged = whole(**tensors).logits[tensors["attention_mask"].bool()].double()
        torch.testing.assert_close(twin, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(before, unmerged, rtol=1e-5, atol=1e-5)
        assert not torch.equal(twin, before)  # the twin computed through merged weights
    finally:
        fresh.release()
