"""config.json is compared by meaning: a transformers-4 base against a transformers-5 merge.

The base is a tiny model whose ``config.json`` is rewritten the way transformers 4 wrote it
(``rope_theta``/``rope_scaling``, ``torch_dtype``, no default-valued keys); the adapter is trained
on it and merged by peft, and the merge saved by the installed transformers 5, as a user who
fine-tunes a hub model gets it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from support.checkpoints import edit_config

from harness.checks.structure import checks as structure_checks
from harness.checks.weights import checks as weight_checks
from harness.legacy import TRANSFORMERS4_VERSION, write_transformers4_config
from harness.run.config import GateConfig
from harness.run.context import Context
from harness.run.result import CheckResult, Outcome
from harness.run.runner import run_check
from harness.run.settings import Settings
from harness.tiny import build_adapter, build_base, peft_merge


def results(merged: Path, base: Path, adapter: Path, allow: frozenset[str] = frozenset()
            ) -> dict[str, CheckResult]:
    """Every structure and weights check's result, by name."""
    settings = Settings(merged=merged, base=base, adapter=adapter,
                        config=GateConfig(config_allow=allow))
    ctx = Context(settings)
    suite = structure_checks(settings) + weight_checks(settings)
    return {c.name: run_check(c, ctx) for c in suite}


@pytest.fixture(scope="module", params=["llama", "phi3", "qwen2"])
def v4_merge(request, tmp_path_factory):
    """A transformers-4 base config, a peft merge saved by transformers 5."""
    root = tmp_path_factory.mktemp(f"v4-{request.param}")
    base = build_base(root / "base", request.param, "BF16")
    write_transformers4_config(base)
    adapter = build_adapter(base, root / "adapter", target_modules="all-linear")
    merged = peft_merge(base, adapter, root / "merged")
    return base, adapter, merged


def test_the_configs_really_are_spelled_differently(v4_merge):
    base, _, merged = v4_merge
    old = json.loads((base / "config.json").read_text())
    new = json.loads((merged / "config.json").read_text())
    assert "rope_theta" in old and "rope_parameters" not in old and "torch_dtype" in old
    assert old["transformers_version"] == TRANSFORMERS4_VERSION
    assert "rope_parameters" in new and "rope_theta" not in new and "dtype" in new
    assert new["transformers_version"].startswith("5.")


def test_a_transformers4_base_and_a_transformers5_merge_pass(v4_merge):
    base, adapter, merged = v4_merge
    found = results(merged, base, adapter)
    failed = {n: r.message for n, r in found.items() if r.outcome is Outcome.FAILED}
    assert not failed, failed
    message = found["config_allowlist"].message
    assert "read as " in message and "Config" in message
    assert "spelled differently, same meaning" in message and "rope_theta" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"rope_theta": 500000.0}, "'rope_parameters.rope_theta': base 10000.0, merged 500000.0"),
        ({"max_position_embeddings": 4096},
         "'max_position_embeddings': base 128, merged 4096"),
    ],
    ids=["rope_theta", "max_position_embeddings"],
)
def test_a_real_change_still_fails(v4_merge, tmp_path, change, expected):
    base, adapter, merged = v4_merge
    faulty = tmp_path / "merged"
    shutil.copytree(merged, faulty)
    config = json.loads((faulty / "config.json").read_text())
    if "rope_theta" in change:
        config["rope_parameters"] = {**config["rope_parameters"], **change}
    else:
        config.update(change)
    (faulty / "config.json").write_text(json.dumps(config))
    found = results(faulty, base, adapter)["config_allowlist"]
    assert found.outcome is Outcome.FAILED
    assert expected in found.message


def test_a_real_change_of_the_old_spelling_fails(workshop, tmp_path):
    # the other way round: a transformers-4 merge whose rope_theta differs from a v5 base
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base, target_modules=["q_proj"])
    merged = tmp_path / "merged"
    shutil.copytree(workshop.peft(base, adapter), merged)
    write_transformers4_config(merged)
    edit_config(merged, rope_theta=1e6)
    found = results(merged, base, adapter)["config_allowlist"]
    assert found.outcome is Outcome.FAILED
    assert "'rope_parameters.rope_theta': base 10000.0, merged 1000000.0" in found.message


def test_provenance_keys_are_allowed_and_others_need_config_allow(workshop, tmp_path):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base, target_modules=["q_proj"])
    merged = tmp_path / "merged"
    shutil.copytree(workshop.peft(base, adapter), merged)
    edit_config(merged, unsloth_version="2025.11.1", unsloth_fixed=True)
    passed = results(merged, base, adapter)["config_allowlist"]
    assert passed.outcome is Outcome.PASSED
    assert "provenance keys: unsloth_fixed, unsloth_version" in passed.message
    edit_config(merged, exporter_build="abc123")
    failed = results(merged, base, adapter)["config_allowlist"]
    assert failed.outcome is Outcome.FAILED
    assert "'exporter_build': base None, merged 'abc123'" in failed.message
    allowed = results(merged, base, adapter, frozenset({"exporter_build"}))["config_allowlist"]
    assert allowed.outcome is Outcome.PASSED
    assert "allowed changes: exporter_build" in allowed.message


def test_an_unknown_model_type_is_compared_as_written(workshop, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(workshop.base("llama", "BF16"), base)
    edit_config(base, model_type="my_custom_arch")
    merged = tmp_path / "merged"
    shutil.copytree(base, merged)
    settings = Settings(merged=merged, base=base)
    ctx = Context(settings)
    [check] = [c for c in structure_checks(settings) if c.name == "config_allowlist"]
    found = run_check(check, ctx)
    assert found.outcome is Outcome.PASSED
    assert "compared as written: transformers has no config class for 'my_custom_arch'" in (
        found.message)
    edit_config(merged, rope_parameters={"rope_theta": 1.0, "rope_type": "default"})
    found = run_check(check, Context(replace(settings)))
    assert found.outcome is Outcome.FAILED
