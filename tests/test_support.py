"""The test support itself: one tiny-model cache per session, the factory's parts, the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from support.badinput import CASES, render_case_table
from support.checkpoints import read_tensors

from harness.io.checkpoint import INDEX_FILE
from harness.tiny import AdapterSpec, ModelSpec

#: The session fixtures of tests/conftest.py and the plugin that build tiny models.
SHARED = ("tiny_merge_factory", "tiny_llama", "tiny_llama_bf16", "tiny_llama_sharded", "workshop")


def test_no_test_module_rebinds_a_shared_fixture(request):
    """A module that imports or redefines a session fixture gets its own copy, built again."""
    rebound = {
        f"{item.module.__name__}.{name}"
        for item in request.session.items
        if getattr(item, "module", None) is not None
        for name in SHARED
        if name in vars(item.module)
    }
    assert not rebound


def test_every_fixture_is_a_view_of_the_one_factory_cache(
    workshop, tiny_merge_factory, tiny_llama_bf16, tiny_llama_sharded
):
    assert workshop.factory is tiny_merge_factory
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base)
    assert (base, adapter, workshop.peft(base, adapter)) == (
        tiny_llama_bf16.base, tiny_llama_bf16.adapter, tiny_llama_bf16.merged)
    assert workshop.base("llama", "BF16", shard="20KB") == tiny_llama_sharded.base
    for folder in (base, adapter, tiny_llama_sharded.merged, workshop.ours(base, adapter)):
        assert folder.parent == tiny_merge_factory.root


def test_factory_builds_other_peft_types(tiny_merge_factory, workshop):
    # The IA3 case of test_delta, asked for through both doors: one build.
    config = {"target_modules": ["q_proj", "v_proj", "down_proj"],
              "feedforward_modules": ["down_proj"]}
    case = tiny_merge_factory(peft_type="IA3", tokenizer=False, scale=0.3, **config)
    base = workshop.base("llama", "F32")
    assert case.base == base
    assert case.merged == workshop.peft(base, workshop.other_adapter(base, "IA3", **config))
    assert case.adapter_config["peft_type"] == "IA3"
    weights, merged = read_tensors(case.base), read_tensors(case.merged)
    changed = {n for n in weights if not torch.equal(weights[n], merged[n])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in (0, 1)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}


def test_factory_saves_shards(tiny_llama_sharded):
    for folder in (tiny_llama_sharded.base, tiny_llama_sharded.merged):
        index = json.loads((folder / INDEX_FILE).read_text())
        assert len(set(index["weight_map"].values())) == 3
    assert read_tensors(tiny_llama_sharded.merged).keys() == read_tensors(
        tiny_llama_sharded.base).keys()


def test_factory_merges_adapters_in_sequence(tiny_merge_factory):
    # test_merger's two adapters in sequence, merged by peft here as well as by the harness.
    model = ModelSpec(dtype="BF16", tokenizer=False)
    first = AdapterSpec((("target_modules", ["q_proj", "v_proj"]),), seed=1)
    second = AdapterSpec(
        (("target_modules", ["q_proj", "up_proj"]), ("use_dora", True)), seed=2)
    theirs = tiny_merge_factory.merge(model, [first, second])
    ours = tiny_merge_factory.merge(model, [first, second], method="harness")
    assert tiny_merge_factory.merge(model, [first, second]) == theirs  # cached
    peft, mine = read_tensors(theirs), read_tensors(ours)
    assert peft.keys() == mine.keys()
    for name in peft:
        assert torch.equal(peft[name].view(torch.uint8), mine[name].view(torch.uint8)), name
    once = read_tensors(tiny_merge_factory.merge(model, [first], method="harness"))
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(once[up], peft[up])  # the second adapter was applied too


def test_case_table_renders_every_case_without_torch():
    table = render_case_table().splitlines()
    assert table[0] == "| input | bad input | exit | failing check | what the user sees |"
    assert len(table) == 2 + len(CASES)
    for case, row in zip(CASES, table[2:], strict=True):
        assert row.startswith(f"| {case.input} | ") and f"| {case.status} |" in row
        assert "{root}" not in row and row.count(" | ") == 4
    support = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(support)!r}); import support.badinput as b; "
            "b.render_case_table(); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
