"""The fixtures the plugin gives users: tiny merge factory, merge_case and loaded models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from harness.tiny import MergeSpec, ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")



def tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def changed(case):
    base, merged = tensors(case.base), tensors(case.merged)
    return {n for n in base if n in merged and not torch.equal(base[n], merged[n])}


# ---- tiny_merge_factory ----------------------------------------------------------------------


def test_factory_caches_per_parameters(tiny_merge_factory):
    first = tiny_merge_factory(arch="llama", dtype="BF16", r=2)
    assert tiny_merge_factory(arch="llama", dtype="BF16", r=2) is first
    other = tiny_merge_factory(arch="llama", dtype="BF16", r=3)
    assert other is not first
    assert other.base == first.base  # one base per model spec, shared by its adapters
    assert other.adapter != first.adapter and other.merged != first.merged
    spec = tiny_merge_factory.spec(arch="llama", dtype="BF16", r=2)
    assert tiny_merge_factory(spec) is first
    with pytest.raises(TypeError):
        tiny_merge_factory(spec, r=2)


def test_factory_case_folders_and_configs(tiny_merge_factory):
    case = tiny_merge_factory(arch="qwen2", dtype="F16", r=4, lora_alpha=16)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (case.merged / name).is_file(), name
        assert (case.base / name).is_file(), name
    assert case.config["model_type"] == "qwen2"
    assert case.adapter_config["r"] == 4 and case.adapter_config["lora_alpha"] == 16
    assert case.adapter_config["base_model_name_or_path"] == str(case.base)
    assert case.task == "CAUSAL_LM" and case.vocab_size == 128
    assert {t.dtype for t in tensors(case.merged).values()} == {torch.float16}
    # the adapter's random weights are non-zero: every targeted linear layer changed
    assert changed(case) == {n for n in tensors(case.base) if n.endswith("proj.weight")}


@pytest.mark.parametrize(
    ("keywords", "touched"),
    [
        ({"arch": "llama", "use_dora": True, "target_modules": ["q_proj"]}, {"q_proj"}),
        ({"arch": "llama", "use_rslora": True, "r": 8}, {"q_proj", "down_proj"}),
        (
            {
                "arch": "mistral",
                "target_modules": ["q_proj", "v_proj"],
                "rank_pattern": {"v_proj": 2},
                "alpha_pattern": {"q_proj": 32},
            },
            {"q_proj", "v_proj"},
        ),
        (
            {"arch": "llama", "target_modules": ["k_proj"], "modules_to_save": ["lm_head"]},
            {"k_proj", "lm_head"},
        ),
        (
            {"arch": "llama", "target_modules": ["embed_tokens", "lm_head"]},
            {"embed_tokens", "lm_head"},
        ),
        ({"arch": "gpt2", "target_modules": ["c_attn"]}, {"c_attn"}),
        ({"arch": "gemma", "dtype": "BF16"}, {"gate_proj"}),
        ({"arch": "phi3", "dtype": "F16"}, {"qkv_proj", "gate_up_proj"}),
        ({"arch": "bert", "task": "SEQ_CLS"}, {"query", "classifier"}),
        ({"arch": "llama", "task": "SEQ_CLS", "target_modules": ["v_proj"]}, {"v_proj", "score"}),
        ({"arch": "llama", "dtype": "BF16", "method": "harness"}, {"up_proj"}),
    ],
)
def test_factory_builds_each_kind_of_adapter(tiny_merge_factory, keywords, touched):
    case = tiny_merge_factory(scale=0.05, **keywords)
    names = changed(case)
    for module in touched:
        assert any(f"{module}." in n or n.startswith(f"{module}.") for n in names), (module, names)
    assert not any("lora_" in n or "base_layer" in n for n in tensors(case.merged))


def test_factory_accepts_drawn_specs(tiny_merge_factory):
    spec = MergeSpec(ModelSpec("mistral", "BF16", seed=3), (("r", 2),), adapter_seed=5, scale=0.05)
    case = tiny_merge_factory(spec)
    assert case.spec == spec and case.adapter_config["r"] == 2
    assert json.loads((case.merged / "config.json").read_text())["model_type"] == "mistral"


def test_case_loads_models_lazily_and_measures(tiny_merge_factory):
    case = tiny_merge_factory(arch="llama", dtype="F32", r=2, scale=0.05)
    probe = case.probe_space().calibration_probe()
    figures = case.measure(probe)
    assert figures.ok and figures.merged.max_abs < 1e-4
    assert type(case.merged_model()).__name__ == "LlamaForCausalLM"
    assert type(case.adapter_model()).__name__.startswith("PeftModel")
    assert not hasattr(case.base_model(), "peft_config")
    results = case.run_checks("behaviour")
    assert {r.outcome.value for r in results.values()} == {"passed"}
    case.release()


# ---- merge_case and the model fixtures, as a user's own test file uses them ---------------------

USER_TESTS = """
import torch
from hypothesis import given, settings, strategies as st


def test_case_is_the_command_line_merge(merge_case):
    assert merge_case.merged.is_dir()
    assert merge_case.task == "CAUSAL_LM"


@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_merged_behaves_like_the_adapter(merge_case, merged_model, data):
    probe = data.draw(merge_case.probe_inputs(max_length=8))
    assert merge_case.measure(probe).ok
    with torch.no_grad():
        logits = merged_model(**probe.tensors(merge_case.device)).logits
    assert torch.isfinite(logits).all()


def test_models(base_model, adapter_model, merged_model):
    assert not hasattr(base_model, "peft_config")
    assert hasattr(adapter_model, "peft_config")
    assert type(merged_model).__name__ == "LlamaForCausalLM"
"""


def test_user_tests_with_merge_case_and_models(pytester, tiny_merge_factory):
    case = tiny_merge_factory(arch="llama", dtype="BF16", scale=0.05)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest(
        "--merged-model",
        str(case.merged),
        "--base-model",
        str(case.base),
        "--adapter",
        str(case.adapter),
        "-m",
        "not merge_harness",
        "-p",
        "no:randomly",
    )
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=3, deselected=result.parseoutcomes().get("deselected", 0))


def test_user_tests_skip_without_a_merge(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest("-rs", "-p", "no:randomly")
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*no merge named: pass --merged-model PATH*"])


def test_merge_case_is_the_harness_merge_without_merged_model(pytester, tiny_merge_factory):
    case = tiny_merge_factory(arch="gpt2", dtype="F32", scale=0.05)
    pytester.makepyfile(
        test_user="""
def test_merged_by_the_harness(merge_case, merged_model):
    assert merge_case.merged.name == "merged"
    assert merge_case.merged.parent.name.startswith("merge-harness-")
    assert type(merged_model).__name__ == "GPT2LMHeadModel"
"""
    )
    result = pytester.runpytest(
        "--base-model",
        str(case.base),
        "--adapter",
        str(case.adapter),
        "-m",
        "not merge_harness",
        "-p",
        "no:randomly",
    )
    assert result.ret == 0, result.stdout.str()


def test_unloadable_merge_is_a_fixture_error(pytester, tiny_merge_factory, tmp_path):
    import shutil

    case = tiny_merge_factory(arch="llama")
    custom = tmp_path / "custom"
    shutil.copytree(case.merged, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (custom / "config.json").write_text(json.dumps(config))
    pytester.makepyfile(test_user="def test_it(merged_model):\n    pass\n")
    result = pytester.runpytest(
        "--merged-model", str(custom), "-m", "not merge_harness", "-p", "no:randomly"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*cannot load the merged model*auto_map*"])


def test_fixtures_are_documented(pytester):
    result = pytester.runpytest("--fixtures", "-v", "-p", "no:randomly")
    out = result.stdout.str()
    for name in ("tiny_merge_factory", "merge_case", "base_model", "adapter_model", "merged_model"):
        assert f"{name} [session scope]" in out, name
    result.stdout.fnmatch_lines(["*Build tiny random merge cases on disk in seconds*"])


def test_plugin_entry_imports_no_torch():
    code = (
        "import sys, harness.plugin; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
