"""The public hypothesis strategies and settings profiles."""

from __future__ import annotations

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from peft import LoraConfig

from harness.behaviour.probe import ProbeInput, ProbeSpace
from harness.strategies import (
    PROFILE_CI,
    PROFILE_DEV,
    load_profile,
    lora_configs,
    merge_cases,
    model_configs,
    probe_inputs,
)
from harness.tiny import ARCHITECTURES, MODULES, MergeSpec, ModelSpec

# ---- probe inputs ------------------------------------------------------------------------


@given(
    data=st.data(),
    vocab=st.integers(1, 300),
    lo=st.integers(1, 6),
    span=st.integers(0, 6),
    batch=st.integers(1, 5),
)
def test_probe_inputs_respect_their_bounds(data, vocab, lo, span, batch):
    specials = data.draw(st.lists(st.integers(0, vocab - 1), max_size=3))
    pad = data.draw(st.none() | st.integers(0, vocab - 1))
    probe = data.draw(
        probe_inputs(
            vocab_size=vocab,
            special_ids=specials,
            pad_id=pad,
            min_length=lo,
            max_length=lo + span,
            max_batch=batch,
        )
    )
    assert 1 <= probe.batch <= batch
    assert probe.length <= lo + span
    for ids, mask in zip(probe.input_ids, probe.attention_mask, strict=True):
        assert len(ids) == len(mask) == probe.length
        assert all(0 <= i < vocab for i in ids)
        real = sum(mask)
        assert lo <= real <= lo + span
        if probe.padding == "left":
            assert list(mask) == [0] * (len(mask) - real) + [1] * real
        else:
            assert list(mask) == [1] * real + [0] * (len(mask) - real)
        fill = 0 if pad is None else pad
        assert all(t == fill for t, m in zip(ids, mask, strict=True) if not m)
    if probe.padding == "none":
        assert all(all(m) for m in probe.attention_mask)


def test_probe_inputs_draw_special_tokens():
    strategy = probe_inputs(vocab_size=50_000, special_ids=[49_999], max_length=8)
    found = find(strategy, lambda p: any(49_999 in row for row in p.input_ids))
    assert found.input_ids == ((49_999,),)


def test_probe_inputs_shrink_to_one_token():
    minimal = find(probe_inputs(vocab_size=10, min_length=1, max_length=9), lambda p: True)
    assert minimal == ProbeInput(((0,),), ((1,),), "none")


def test_probe_inputs_shrink_a_padding_dependent_failure():
    # a "failure" that needs a padded row: the minimal example is two rows, one padded
    def needs_padding(p: ProbeInput) -> bool:
        return p.padding != "none" and any(0 in row for row in p.attention_mask)

    minimal = find(probe_inputs(vocab_size=10, max_length=5), needs_padding)
    assert minimal.batch == 2 and minimal.length == 2 and minimal.tokens == 3


def test_probe_tensors_and_description():
    probe = ProbeInput(((0, 5, 6), (0, 0, 7)), ((0, 1, 1), (0, 0, 1)), "left")
    tensors = probe.tensors()
    assert tensors["input_ids"].tolist() == [[0, 5, 6], [0, 0, 7]]
    assert tensors["attention_mask"].sum().item() == 3
    assert probe.describe() == (
        "batch 2 x length 3, padding left: input_ids [[_, 5, 6], [_, _, 7]]"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"vocab_size": 10, "min_length": 0}, "min_length"),
        ({"vocab_size": 10, "min_length": 5, "max_length": 4}, "must not exceed"),
        ({"vocab_size": 10, "max_batch": 0}, "max_batch"),
        ({"vocab_size": 10, "special_ids": [10]}, "special_ids"),
        ({"vocab_size": 10, "pad_id": -1}, "pad_id"),
        ({"vocab_size": 10, "paddings": ["middle"]}, "paddings"),
        ({"vocab_size": 10, "paddings": "left"}, "paddings"),
        ({"vocab_size": 1.5}, "integer"),
    ],
)
def test_probe_inputs_validate_eagerly(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        probe_inputs(**kwargs)  # no draw: the error comes at creation


def test_probe_space_from_config():
    config = {
        "vocab_size": 100,
        "max_position_embeddings": 8,
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
        "pad_token_id": None,
    }
    space = ProbeSpace.from_config(config, max_length=32)
    assert space.max_length == 8 and space.special_ids == (1, 2, 3) and space.pad_id is None
    # a decoder classifier without pad id pools the last token: single unpadded rows only
    cls = ProbeSpace.from_config(config, task="SEQ_CLS")
    assert cls.max_batch == 1 and cls.paddings == ("none",)
    bert = ProbeSpace.from_config({**config, "model_type": "bert"}, task="SEQ_CLS")
    assert bert.max_batch == 4
    probe = space.calibration_probe()
    assert probe.batch == 4 and probe.length == 8


# ---- model and adapter configs ---------------------------------------------------------------


@given(spec=model_configs())
def test_model_configs_are_valid_specs(spec):
    assert spec.arch in ARCHITECTURES
    assert spec.task == "CAUSAL_LM"
    layers = dict(spec.overrides)[MODULES[spec.arch].layers_key]
    assert 1 <= layers <= 2


def test_model_configs_encoders_only_for_classification():
    with pytest.raises(InvalidArgument, match="supports the tasks"):
        model_configs(architectures=["bert"])
    spec = find(model_configs(architectures=["bert", "llama"], tasks=["SEQ_CLS"]), lambda s: True)
    assert spec.task == "SEQ_CLS"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"architectures": ["llama", "t5"]}, "unknown"),
        ({"dtypes": ["F8"]}, "unknown"),
        ({"dtypes": []}, "must not be empty"),
        ({"min_layers": 3, "max_layers": 2}, "must not exceed"),
        ({"seeds": []}, "seeds"),
    ],
)
def test_model_configs_validate_eagerly(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        model_configs(**kwargs)


@given(data=st.data(), arch=st.sampled_from(sorted(ARCHITECTURES)))
def test_lora_configs_make_valid_peft_configs(data, arch):
    kwargs = data.draw(lora_configs(architecture=arch))
    config = LoraConfig(**kwargs)  # peft accepts every drawn combination
    modules = MODULES[arch]
    assert config.fan_in_fan_out is modules.conv1d
    targets = kwargs["target_modules"]
    if modules.tied:
        # neither side of a tie is drawn unless asked for: the unmerged model changes one side
        assert targets == "all-linear" or not {modules.embedding, modules.head} & set(targets)
        assert "modules_to_save" not in kwargs
    if kwargs["use_dora"] and targets != "all-linear":
        assert modules.embedding not in targets
    for name in kwargs.get("rank_pattern", {}):
        assert name in modules.linear


def test_lora_configs_flags_force_features():
    config = find(
        lora_configs(
            architecture="llama", rslora=True, dora=False, patterns=True, modules_to_save=True
        ),
        lambda c: True,
    )
    assert config["use_rslora"] is True and config["use_dora"] is False
    assert config["rank_pattern"] and config["alpha_pattern"]
    assert config["modules_to_save"] == ["lm_head"]
    embedding = find(lora_configs(architecture="mistral", embeddings=True), lambda c: True)
    assert {"embed_tokens", "lm_head"} & set(embedding["target_modules"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"architecture": "t5"}, "architecture"),
        ({"min_rank": 0}, "min_rank"),
        ({"min_rank": 4, "max_rank": 2}, "must not exceed"),
        ({"dora": "yes"}, "True, False or None"),
        ({"dora": True, "embeddings": True}, "DoRA"),
        ({"task_type": "SEQ_CLS", "modules_to_save": True}, "causal LMs"),
        ({"task_type": "TRANSLATE"}, "task_type"),
    ],
)
def test_lora_configs_validate_eagerly(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        lora_configs(**kwargs)


# ---- merge cases -------------------------------------------------------------------------------


@given(spec=merge_cases(methods=["peft", "harness"], embeddings=None))
def test_merge_cases_are_well_formed(spec):
    assert isinstance(spec, MergeSpec)
    assert spec.method in ("peft", "harness")
    assert spec.scale in (0.05, 0.5)
    lora = spec.lora_kwargs
    LoraConfig(**lora)
    if spec.model.modules.tied and spec.method == "peft":
        targets = lora["target_modules"]
        assert targets == "all-linear" or spec.model.modules.embedding not in targets
    assert (
        spec.key()
        == MergeSpec(
            spec.model, tuple(lora.items()), spec.adapter_seed, spec.scale, spec.method
        ).key()
    )
    assert hash(spec) == hash(
        MergeSpec(spec.model, tuple(lora.items()), spec.adapter_seed, spec.scale, spec.method)
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"methods": ["mergekit"]}, "unknown"),
        ({"scales": []}, "scales"),
        ({"scales": [0.0]}, "positive"),
        ({"min_rank": 9, "max_rank": 8}, "must not exceed"),
        ({"tasks": ["SEQ_2_SEQ_LM"]}, "unknown"),
    ],
)
def test_merge_cases_validate_eagerly(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        merge_cases(**kwargs)


def test_specs_validate_their_fields():
    with pytest.raises(ValueError, match="architecture"):
        ModelSpec("t5")
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec("llama", "F8")
    with pytest.raises(ValueError, match="method"):
        MergeSpec(method="mergekit")


# ---- profiles ----------------------------------------------------------------------------------


def test_profiles_derive_from_the_ci_profile():
    ci = settings.get_profile(PROFILE_CI)
    assert ci.derandomize is True and ci.database is None and ci.deadline is None
    assert ci.print_blob is True  # inherited from hypothesis' own "ci"
    dev = settings.get_profile(PROFILE_DEV)
    assert dev.derandomize is False and dev.database is not None and dev.deadline is None
    assert dev.max_examples < ci.max_examples


def test_load_profile_picks_from_the_environment():
    current = settings._current_profile
    try:
        assert load_profile({}) == PROFILE_DEV
        assert load_profile({"CI": "true"}) == PROFILE_CI
        assert load_profile({"CI": "true", "HYPOTHESIS_PROFILE": PROFILE_DEV}) == PROFILE_DEV
    finally:
        settings.load_profile(current)
