"""The benchmark gate on real lm-eval runs over tiny local tasks, and the perplexity gate.

One lm-eval run per model (merged, base, unmerged adapter) on a task whose answers are the base
model's own preferences serves every outcome test: the thresholds are applied to the same
evidence through the real item function.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from harness.checks.benchmark import checks, run_metric, run_perplexity
from harness.errors import ConfigError
from harness.evals.lm_eval import (
    MetricRun,
    evidence_from_runs,
    find_task_yaml,
    resolve_task_paths,
    run_lm_eval,
)
from harness.evals.perplexity import windows
from harness.evals.tokenizer import build_char_tokenizer
from harness.run.config import parse
from harness.run.context import Context
from harness.run.result import Outcome
from harness.run.settings import Settings

# Imported before any in-process pytester run elsewhere in the session (see test_lock.py).
pytest.importorskip("lm_eval")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TASK_YAML = """
task: prefer
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/test.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
process_docs: !function helpers.keep
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _base_preferences(base: Path, tokenizer: Path, rows: list[dict]) -> list[int]:
    """The choice the base model finds most likely, scored like lm-eval scores it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    labels = []
    with torch.inference_mode():
        for row in rows:
            context = tok(f"{row['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
            scores = []
            for choice in row["choices"]:
                cont = tok(f" {choice}", add_special_tokens=False)["input_ids"]
                ids = torch.tensor([context + cont])
                logprobs = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
                positions = range(len(context) - 1, len(context) + len(cont) - 1)
                scores.append(
                    sum(float(logprobs[p, t]) for p, t in zip(positions, cont, strict=True))
                )
            labels.append(max(range(len(scores)), key=scores.__getitem__))
    return labels


@pytest.fixture(scope="module")
def prefer_task(tmp_path_factory, tiny_llama) -> Path:
    """A task folder whose labels are the base model's own answers (base accuracy 1.0)."""
    root = tmp_path_factory.mktemp("tasks")
    folder = root / "prefer"
    (folder / "data").mkdir(parents=True)
    source = FIXTURES / "tasks" / "tiny_choice" / "data" / "test.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()][:40]
    tokenizer = build_char_tokenizer(root / "tokenizer", 128)
    for row, label in zip(rows, _base_preferences(tiny_llama.base, tokenizer, rows), strict=True):
        row["label"] = label
    (folder / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "prefer.yaml").write_text(TASK_YAML)
    # A !function helper next to the YAML, as real lm-eval task folders have.
    (folder / "helpers.py").write_text("def keep(dataset):\n    return dataset\n")
    return root


def _context(tiny, table: dict, source: Path, **options) -> Context:
    gate = parse(table, source)
    return Context(
        Settings(
            merged=tiny.merged,
            base=tiny.base,
            adapter=tiny.adapter,
            config=gate,
            lock_path=source.parent / "no.lock",
            **options,
        )
    )


def _bench(include: Path, thresholds: dict, **extra) -> dict:
    return {
        "tokenizer": "builtin:chars",
        "benchmark": {"include_path": str(include), "tasks": {"prefer": thresholds}, **extra},
    }


@pytest.fixture(scope="module")
def evaluated(tiny_llama, prefer_task):
    """One Context whose lm-eval runs (merged, base, adapter) are cached for every test."""
    table = _bench(prefer_task, {"acc": {"max_drop": 0.1, "max_adapter_diff": 0.2}})
    ctx = _context(tiny_llama, table, prefer_task / "gate.toml")
    for model in ("merged", "base", "adapter"):
        run_lm_eval(ctx, model)
    return ctx


def _item(ctx: Context, thresholds: dict, source: Path, **bench):
    """Run the real item function with other thresholds on the cached evaluations."""
    config = parse(_bench(source, {"acc": thresholds}, **bench), source / "gate.toml")
    ctx.settings = dataclasses.replace(ctx.settings, config=config)
    return run_metric("prefer", "acc", ctx)


def test_lm_eval_runs_locally_on_every_model(evaluated):
    runs = {
        m: run_lm_eval(evaluated, m)["prefer"]["acc,none"] for m in ("merged", "base", "adapter")
    }
    assert len(runs["merged"].samples) == 40
    # The labels are the base model's own answers.
    assert runs["base"].aggregate == pytest.approx(1.0)
    # lm-eval's peft path (base + adapter, unmerged) answers exactly like the merged model.
    assert runs["adapter"].samples == runs["merged"].samples
    assert runs["merged"].higher_is_better is True


def test_benchmark_passes(evaluated, prefer_task):
    result = _item(evaluated, {"floor": 0.2, "max_adapter_diff": 0.2}, prefer_task)
    assert result.outcome is Outcome.PASSED, result.message
    assert result.metrics["n"] == 40 and result.record is not None and not result.record.reused
    assert result.metrics["decisions"]["floor"]["outcome"] == "passed"
    adapter = result.metrics["decisions"]["max_adapter_diff"]
    assert adapter["outcome"] == "passed" and adapter["figures"]["discordant"] == 0


def test_benchmark_fails_on_floor(evaluated, prefer_task):
    result = _item(evaluated, {"floor": 0.95}, prefer_task)
    assert result.outcome is Outcome.FAILED
    assert "not >= 0.95" in result.message and "acc" in result.message


def test_benchmark_fails_on_drop_against_base(evaluated, prefer_task):
    # The merged model gives up some of the base's answers: at most 2 points may be lost.
    result = _item(evaluated, {"max_drop": 0.02}, prefer_task)
    assert result.outcome is Outcome.FAILED, result.message
    drop = result.metrics["decisions"]["max_drop"]["figures"]["drop"]
    assert drop["low"] > 0.02  # significantly worse than the base, not just noisy
    assert result.record.values["base"] == pytest.approx(1.0)
    assert result.record.values["merged"] < 1.0
    # An allowance equal to the observed loss is undecidable on 40 documents, not a silent pass.
    observed = result.record.values["base"] - result.record.values["merged"]
    loose = _item(evaluated, {"max_drop": observed}, prefer_task)
    assert loose.outcome is Outcome.INCONCLUSIVE
    # Direction-aware: declared lower-is-better, the same numbers are an improvement.
    better = _item(evaluated, {"max_drop": 0.02, "higher_is_better": False}, prefer_task)
    assert better.outcome is Outcome.PASSED


def test_benchmark_inconclusive_on_too_few_samples(tiny_llama, prefer_task):
    # A fresh evaluation of 6 documents: even a floor the interval clears cannot pass on that
    # few (min_samples), and a floor inside the interval is undecidable either way.
    table = _bench(prefer_task, {"acc": {"floor": 0.05}}, limit=6)
    ctx = _context(tiny_llama, table, prefer_task / "gate.toml")
    few = run_metric("prefer", "acc", ctx)
    assert few.outcome is Outcome.INCONCLUSIVE, few.message
    assert few.metrics["n"] == 6 and "too few documents to pass (min_samples 30)" in few.message
    straddle = _item(ctx, {"floor": 0.5, "min_samples": 1}, prefer_task, limit=6)
    assert straddle.outcome is Outcome.INCONCLUSIVE and "straddles 0.5" in straddle.message


def test_missing_metric_is_a_failed_check(evaluated, prefer_task):
    config = parse(_bench(prefer_task, {"f1": {"floor": 0.5}}), prefer_task / "gate.toml")
    evaluated.settings = dataclasses.replace(evaluated.settings, config=config)
    result = run_metric("prefer", "f1", evaluated)
    assert result.outcome is Outcome.FAILED and "it reported: acc" in result.message


def test_aggregate_only_metrics_are_judged_on_the_point_value():
    runs = {"merged": MetricRun(12.0, {}, False), "base": MetricRun(11.0, {}, False)}
    evidence = evidence_from_runs(runs, False)
    assert evidence["pairs"] == {}
    assert evidence["models"]["merged"]["aggregate"] == 12.0


def test_task_paths_resolve_relative_to_the_yaml(tmp_path):
    (tmp_path / "sub" / "data").mkdir(parents=True)
    (tmp_path / "sub" / "data" / "a.jsonl").write_text("{}\n")
    yaml_path = tmp_path / "sub" / "t.yaml"
    config = {
        "task": "t",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "data/a.jsonl", "extra": ["data/*.jsonl"]}},
    }
    resolved = resolve_task_paths(config, yaml_path, tmp_path / "cache")
    files = resolved["dataset_kwargs"]["data_files"]
    assert files["test"] == str(tmp_path / "sub" / "data" / "a.jsonl")
    assert files["extra"] == [str(tmp_path / "sub" / "data" / "*.jsonl")]
    assert resolved["dataset_kwargs"]["cache_dir"] == str(tmp_path / "cache")
    assert config["dataset_kwargs"]["data_files"]["test"] == "data/a.jsonl"  # input untouched
    with pytest.raises(ConfigError, match=r"data file 'data/b\.jsonl' not found"):
        resolve_task_paths(
            {**config, "dataset_kwargs": {"data_files": "data/b.jsonl"}}, yaml_path, None
        )
    with pytest.raises(ConfigError, match="hub datasets are never downloaded"):
        resolve_task_paths({**config, "dataset_path": "allenai/ai2_arc"}, yaml_path, None)


def test_find_task_yaml_reads_function_tags_without_lm_eval(prefer_task):
    assert find_task_yaml((prefer_task,), "prefer") == prefer_task / "prefer" / "prefer.yaml"
    with pytest.raises(ConfigError, match=r"'nope' is not defined under .*\(found: prefer\)"):
        find_task_yaml((prefer_task,), "nope")


def test_no_benchmark_configuration_means_no_items():
    assert checks(Settings()) == []
    assert checks(Settings(config=parse({}, None))) == []


# ----------------------------------------------------------------------------- perplexity


def test_windows_are_equal_length():
    assert windows(list(range(10)), 4, 100) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(list(range(3)), 4, 100) == [[0, 1, 2]]
    assert windows([1], 4, 100) == []


def _perplexity_context(tiny, tmp_path, merged=None, **extra):
    table = {
        "tokenizer": "builtin:chars",
        "perplexity": {"text": str(FIXTURES / "text" / "sample.txt"), **extra},
    }
    ctx = _context(tiny, table, tmp_path / "gate.toml")
    if merged is not None:
        ctx.settings = dataclasses.replace(ctx.settings, merged=merged)
    return ctx


def test_perplexity_gate_passes_on_a_correct_merge(tiny_llama, tmp_path):
    result = run_perplexity(_perplexity_context(tiny_llama, tmp_path, max_base_ratio=10.0))
    assert result.outcome is Outcome.PASSED, result.message
    ratio = result.metrics["ratio"]
    assert abs(ratio["estimate"] - 1.0) < 1e-4 and ratio["high"] <= 1.01
    assert result.metrics["windows"] == 24 and set(result.metrics["perplexity"]) == {
        "merged",
        "adapter",
        "base",
    }
    assert math.isfinite(result.metrics["perplexity"]["base"])


def test_perplexity_gate_fails_when_the_adapter_was_not_applied(tiny_llama, tmp_path):
    # "Merged" is the base itself: its perplexity is not the adapter model's.
    result = run_perplexity(_perplexity_context(tiny_llama, tmp_path, merged=tiny_llama.base))
    assert result.outcome is Outcome.FAILED, result.message
    assert "outside [0.9901, 1.01]" in result.message


def test_perplexity_streams_within_the_budget(tiny_llama, tmp_path):
    """A budget of a few layers: the same figures, the windows split over several passes."""
    roomy = run_perplexity(_perplexity_context(tiny_llama, tmp_path))
    tight_ctx = _perplexity_context(tiny_llama, tmp_path)
    tight_ctx.settings = dataclasses.replace(tight_ctx.settings, memory=2 * 1024 * 1024)
    tight = run_perplexity(tight_ctx)
    assert tight.outcome is roomy.outcome is Outcome.PASSED
    assert tight.metrics["perplexity"] == pytest.approx(roomy.metrics["perplexity"], rel=1e-6)
    from harness.evals.perplexity import rows_per_pass
    from harness.io.models import read_config

    assert rows_per_pass(read_config(tiny_llama.merged), 128, 24, 2 * 1024 * 1024) < 24
    refused_ctx = _perplexity_context(tiny_llama, tmp_path)
    refused_ctx.settings = dataclasses.replace(refused_ctx.settings, memory=4096)
    refused = run_perplexity(refused_ctx)
    assert refused.outcome is Outcome.SKIPPED and "memory budget" in refused.message


def test_lm_eval_gets_the_budget_through_its_loading_arguments(evaluated, tiny_llama, prefer_task):
    """Beyond the budget, lm-eval's own big-model path: accelerate places what fits, offloads
    the rest to a private folder; the answers are the same. The unmerged adapter model cannot
    go that way in lm-eval (peft on an offloaded base) and is refused with the reason."""
    from harness.evals.lm_eval import model_args
    from harness.evals.tokenizer import scratch_dir
    from harness.forward.pool import MemoryRefusal

    table = _bench(prefer_task, {"acc": {"max_drop": 0.1}})
    ctx = _context(tiny_llama, table, prefer_task / "gate.toml", memory=40 * 1024)
    tokenizer = scratch_dir(ctx) / "tok"
    args = model_args(ctx, "merged", tokenizer)
    assert args["parallelize"] is True and args["max_cpu_memory"] == 40 * 1024
    assert Path(args["offload_folder"]).parent == scratch_dir(ctx)
    with pytest.raises(MemoryRefusal, match="peft cannot load an adapter onto"):
        model_args(ctx, "adapter", tokenizer)
    assert "parallelize" not in model_args(evaluated, "merged", tokenizer)  # it fits: whole
    budgeted = run_lm_eval(ctx, "merged")["prefer"]["acc,none"]
    assert budgeted.samples == run_lm_eval(evaluated, "merged")["prefer"]["acc,none"].samples
    skipped = run_metric("prefer", "acc", _context(tiny_llama, _bench(
        prefer_task, {"acc": {"max_adapter_diff": 0.1}}), prefer_task / "gate.toml",
        memory=40 * 1024))
    assert skipped.outcome is Outcome.SKIPPED and "memory budget" in skipped.message


@pytest.mark.parametrize("kind", ["pipe", "binary"])
def test_a_perplexity_text_that_is_no_text_file_is_one_line(tiny_llama, tmp_path, kind):
    """A pipe is refused before it is opened (it would block the run); bytes that are not
    UTF-8 are named as such."""
    import os

    from harness.errors import HarnessError

    text = tmp_path / "text.txt"
    if kind == "pipe":
        os.mkfifo(text)
    else:
        text.write_bytes(b"\xff\xfe\x00 not text")
    ctx = _perplexity_context(tiny_llama, tmp_path)
    gate = ctx.settings.config
    assert gate is not None and gate.perplexity is not None
    perplexity_config = dataclasses.replace(gate.perplexity, text=text)
    ctx.settings = dataclasses.replace(
        ctx.settings, config=dataclasses.replace(gate, perplexity=perplexity_config)
    )
    expected = "not a regular file" if kind == "pipe" else "not UTF-8 text"
    with pytest.raises(HarnessError, match=expected) as caught:
        run_perplexity(ctx)
    assert "\n" not in str(caught.value) and str(text) in str(caught.value)
