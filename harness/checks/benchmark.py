"""The ``benchmark`` family: lm-eval task metrics and the fast perplexity gate, with lock reuse.

Configured in ``[tool.merge-harness.benchmark]`` and ``[tool.merge-harness.perplexity]``;
without them there are no benchmark items and the default suite stays fast. Each configured
``task.metric`` becomes ``merge::benchmark::<task>.<metric>``; the perplexity gate is
``merge::benchmark::perplexity``. When every digest matches the lock file and the evaluation
fingerprint is unchanged, the recorded evidence is re-judged instead of evaluating again.
"""

from __future__ import annotations

import functools
from typing import Any

from harness.checks.lock import reusable
from harness.dtypes import torch_dtype_name
from harness.evals import perplexity
from harness.evals.lm_eval import (
    MetricRun,
    evidence_from_runs,
    judge,
    metric_key,
    run_lm_eval,
    task_fingerprint,
)
from harness.evals.stats import Summary
from harness.evals.tokenizer import resize_note, resolve
from harness.forward.pool import MemoryRefusal
from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import BenchmarkRecord, CheckResult, Family, Outcome
from harness.run.settings import Settings

PERPLEXITY = "perplexity"


def check_id(name: str) -> str:
    """The item id of a benchmark check."""
    return f"merge::{Family.BENCHMARK.value}::{name}"


def _reused(message: str, reused: bool) -> str:
    return f"reused from lock (evaluation skipped): {message}" if reused else message


def run_metric(task: str, metric: str, ctx: Context) -> CheckResult:
    """The item ``merge::benchmark::<task>.<metric>``: reuse from the lock, or evaluate; judge."""
    bench = ctx.settings.config.benchmark
    if bench is None:
        raise AssertionError("run_metric without a benchmark configuration")
    threshold = bench.tasks[task][metric]
    min_samples = threshold.min_samples or bench.min_samples
    key = metric if "," in metric else f"{metric},none"
    dtype = torch_dtype_name(ctx.settings.dtype)
    _, tokenizer_print = resolve(ctx)
    fingerprint = task_fingerprint(bench, task, bench.models, tokenizer_print, dtype)
    recorded = reusable(ctx, check_id(f"{task}.{metric}"), fingerprint)
    if recorded is not None:
        evidence = dict(recorded["evidence"])
    else:
        runs: dict[str, MetricRun] = {}
        for model in bench.models:
            try:
                task_runs = run_lm_eval(ctx, model).get(task, {})
            except MemoryRefusal as exc:
                return CheckResult.skipped(str(exc), needs=["memory"])
            if key not in task_runs:
                known = ", ".join(k.replace(",none", "") for k in sorted(task_runs)) or "none"
                return CheckResult.failed(
                    f"lm-eval reported no metric {metric!r} for task {task!r}"
                    f" (it reported: {known})"
                )
            runs[model] = task_runs[key]
        hib = runs["merged"].higher_is_better
        evidence = evidence_from_runs(runs, True if hib is None else hib)
    outcome, message, decisions = judge(
        metric_key(metric)[0],
        evidence,
        threshold,
        confidence=bench.confidence,
        min_samples=min_samples,
    )
    values = {m: Summary.from_json(s).value for m, s in dict(evidence.get("models", {})).items()}
    metrics: dict[str, Any] = {
        "task": task,
        "metric": metric,
        "n": Summary.from_json(evidence["models"]["merged"]).n,
        "thresholds": threshold.to_json(),
        "confidence": bench.confidence,
        "min_samples": min_samples,
        "decisions": {
            d.name: {"outcome": d.outcome.value, "text": d.text, "figures": d.figures}
            for d in decisions
        },
    }
    details = [f"{d.name}: {d.outcome.value}: {d.text}" for d in decisions]
    resized = resize_note(ctx) if "adapter" in bench.models else None
    if resized is not None:
        # The verdict stands, but a pass against a resized adapter model is worth a warning.
        details.append(f"note: {resized}")
        metrics["tokenizer_resize"] = resized
        if outcome is Outcome.PASSED:
            outcome = Outcome.WARNING
            message += f"; warning: {resized}"
    result = CheckResult(outcome, _reused(message, recorded is not None), details, metrics)
    result.record = BenchmarkRecord(
        fingerprint, evidence, values.get("merged"), dict(values), recorded is not None
    )
    return result


def run_perplexity(ctx: Context) -> CheckResult:
    """The item ``merge::benchmark::perplexity``."""
    gate = ctx.settings.config
    cfg = gate.perplexity
    if cfg is None:
        raise AssertionError("run_perplexity without a perplexity configuration")
    if not ctx.has_adapter:
        return CheckResult.failed(
            "the perplexity gate compares with the unmerged adapter model: pass --adapter"
        )
    chunks, fingerprint = perplexity.tokenize(ctx)
    recorded = reusable(ctx, check_id(PERPLEXITY), fingerprint)
    try:
        evidence = (
            dict(recorded["evidence"])
            if recorded is not None
            else perplexity.evaluate(ctx, chunks, cfg.models)
        )
    except MemoryRefusal as exc:
        return CheckResult.skipped(str(exc), needs=["memory"])
    outcome, message, details, figures = perplexity.judge(
        evidence, cfg.max_ratio, cfg.max_base_ratio, gate.confidence
    )
    ppl: dict[str, float] = figures["perplexity"]
    result = CheckResult(outcome, _reused(message, recorded is not None), details, figures)
    result.record = BenchmarkRecord(
        fingerprint, evidence, figures["ratio"]["estimate"], dict(ppl), recorded is not None
    )
    return result


def checks(settings: Settings) -> list[Check]:
    """The benchmark family: the perplexity gate and one item per configured task metric.

    Nothing without a ``benchmark`` or ``perplexity`` table in the gate configuration.
    """
    config = settings.config
    found: list[Check] = []
    if config.perplexity is not None:
        found.append(
            Check(
                Family.BENCHMARK,
                PERPLEXITY,
                "perplexity of the merged model matches the unmerged adapter model's",
                run_perplexity,
            )
        )
    if config.benchmark is not None:
        for task, metrics in config.benchmark.tasks.items():
            for metric in metrics:
                found.append(
                    Check(
                        Family.BENCHMARK,
                        f"{task}.{metric}",
                        f"lm-eval {task} {metric} meets its thresholds",
                        functools.partial(run_metric, task, metric),
                    )
                )
    return found
