"""lm-eval on local YAML tasks: task resolution, ``simple_evaluate``, per-metric evidence.

Configured in ``[tool.merge-harness.benchmark]`` (see ``harness.run.config``); the checks that
judge the evidence live in ``harness.checks.benchmark``.

Evaluation runs ``lm_eval.simple_evaluate`` with the HF backend on the local folders: the merged
model (``pretrained=<merged>``), the base (``pretrained=<base>``) and the unmerged adapter model
(``pretrained=<base>, peft=<adapter>``), only those the thresholds need, once per process for all
tasks. Tasks are indexed from the configured folders only (never lm-eval's built-in tasks, whose
data live on the hub); each task's YAML is loaded with lm-eval's own loader (``include`` and
``!function`` resolved next to the YAML) and its local data files are resolved relative to the
YAML (lm-eval would resolve them against the working directory). The datasets cache goes to a
private temporary folder, never the user's folders.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.dtypes import ITEMSIZE, torch_dtype_name
from harness.errors import ConfigError, HarnessError
from harness.evals.stats import (
    Decision,
    Paired,
    Summary,
    combine_outcomes,
    decide_adapter,
    decide_drop,
    decide_floor,
    pair,
    summarize,
)
from harness.evals.tokenizer import resolve, scratch_dir
from harness.extras import install_hint
from harness.forward.pool import MemoryRefusal
from harness.io.models import refuse_hostile_patterns, refuse_remote_code
from harness.memory import default_budget, format_size
from harness.offline import enforce_offline
from harness.run.config import BenchmarkConfig, Threshold
from harness.run.context import Context, Key
from harness.run.result import Outcome
from harness.stream.hashing import hash_file, hash_folder

#: ``datasets`` builders that read local files named by ``data_files`` (not hub datasets).
FILE_BUILDERS = frozenset(
    {"json", "csv", "parquet", "text", "arrow", "pandas", "xml", "webdataset"}
)


def metric_key(metric: str) -> tuple[str, str]:
    """``acc`` -> (``acc``, ``none``); ``exact_match,strict-match`` -> (name, filter)."""
    name, _, filt = metric.partition(",")
    return name, filt or "none"


# ----------------------------------------------------------------------------- task files


class _AnyTagLoader:
    """Builds a PyYAML SafeLoader that reads ``!function`` (or any tag) as a plain scalar."""

    @staticmethod
    def load(text: str) -> Any:
        yaml: Any = importlib.import_module("yaml")

        class Loader(yaml.SafeLoader):  # type: ignore[misc]
            pass

        def any_tag(loader: Any, suffix: str, node: Any) -> Any:
            if isinstance(node, yaml.ScalarNode):
                return loader.construct_scalar(node)
            if isinstance(node, yaml.SequenceNode):
                return loader.construct_sequence(node)
            return loader.construct_mapping(node)

        Loader.add_multi_constructor("!", any_tag)
        return yaml.load(text, Loader=Loader)


def find_task_yaml(include_paths: tuple[Path, ...], task: str) -> Path:
    """The YAML file that defines ``task`` under the include folders (light scan, no lm-eval)."""
    found: list[str] = []
    for root in include_paths:
        for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
            try:
                data = _AnyTagLoader.load(path.read_text(encoding="utf-8"))
            except Exception:  # an unrelated broken YAML must not hide the task we look for
                continue
            if isinstance(data, dict) and isinstance(data.get("task"), str):
                if data["task"] == task:
                    return path
                found.append(data["task"])
    roots = ", ".join(str(p) for p in include_paths)
    known = f" (found: {', '.join(sorted(found)[:10])})" if found else " (no task YAML found)"
    raise ConfigError(f"benchmark task {task!r} is not defined under {roots}{known}")


def _data_paths(spec: Any) -> list[str]:
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, list):
        return [s for s in spec if isinstance(s, str)]
    if isinstance(spec, dict):
        return [p for value in spec.values() for p in _data_paths(value)]
    return []


def _resolve_one(value: str, folder: Path, yaml_path: Path) -> str:
    path = Path(value).expanduser()
    resolved = path if path.is_absolute() else folder / path
    if not any(ch in value for ch in "*?[") and not resolved.exists():
        raise ConfigError(
            f"{yaml_path}: data file {value!r} not found (relative paths are resolved against the"
            " YAML's folder)"
        )
    return str(resolved)


def _resolve_spec(spec: Any, folder: Path, yaml_path: Path) -> Any:
    if isinstance(spec, str):
        return _resolve_one(spec, folder, yaml_path)
    if isinstance(spec, list):
        return [_resolve_spec(s, folder, yaml_path) for s in spec]
    if isinstance(spec, dict):
        return {k: _resolve_spec(v, folder, yaml_path) for k, v in spec.items()}
    return spec


def resolve_task_paths(
    config: dict[str, Any], yaml_path: Path, cache_dir: Path | None
) -> dict[str, Any]:
    """A copy of a task config with local dataset paths made absolute (relative to the YAML).

    ``dataset_path`` must be a file builder (json, csv, parquet, text, ...) or a local folder;
    anything else would be a hub dataset, which the harness refuses (it never downloads).
    """
    folder = yaml_path.parent
    config = dict(config)
    dataset_path = config.get("dataset_path")
    if isinstance(dataset_path, str) and dataset_path not in FILE_BUILDERS:
        local = Path(dataset_path).expanduser()
        local = local if local.is_absolute() else folder / local
        if not local.exists():
            raise ConfigError(
                f"{yaml_path}: dataset_path {dataset_path!r} is neither a local folder nor a file"
                f" builder ({', '.join(sorted(FILE_BUILDERS))}); hub datasets are never downloaded"
            )
        config["dataset_path"] = str(local)
    kwargs = dict(config.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _resolve_spec(kwargs["data_files"], folder, yaml_path)
    if isinstance(kwargs.get("data_dir"), str):
        kwargs["data_dir"] = _resolve_one(kwargs["data_dir"], folder, yaml_path)
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    config["dataset_kwargs"] = kwargs
    return config


def task_fingerprint(
    bench: BenchmarkConfig, task: str, models: tuple[str, ...], tokenizer: str, dtype: str
) -> str:
    """The fingerprint of what a recorded result depends on besides the weights.

    The task's folder and data files, the evaluation settings, the models and the tokenizer.
    """
    yaml_path = find_task_yaml(bench.include_path, task)
    raw = _AnyTagLoader.load(yaml_path.read_text(encoding="utf-8"))
    kwargs = raw.get("dataset_kwargs") if isinstance(raw, dict) else None
    data: dict[str, str] = {}
    if isinstance(kwargs, dict):
        for value in _data_paths(kwargs.get("data_files")):
            path = Path(value) if Path(value).is_absolute() else yaml_path.parent / value
            if path.is_file():
                data[value] = hash_file(path)
    payload = {
        "task": task,
        "folder": hash_folder(yaml_path.parent),
        "data": data,
        "limit": bench.limit,
        "num_fewshot": bench.num_fewshot,
        "models": sorted(models),
        "tokenizer": tokenizer,
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- evaluation


@dataclass
class MetricRun:
    """One metric of one task on one model, as lm-eval reported it."""

    aggregate: float | None
    #: doc_id -> per-document value, when lm-eval logged numeric per-sample values.
    samples: dict[int, float]
    higher_is_better: bool | None

    def summary(self) -> Summary:
        """Sufficient statistics of this run.

        From the per-document values when they average to the aggregate (accuracy-like
        metrics), else the aggregate alone (perplexity-like).
        """
        values = list(self.samples.values())
        if values and (
            self.aggregate is None
            or math.isclose(
                math.fsum(values) / len(values), self.aggregate, rel_tol=1e-6, abs_tol=1e-9
            )
        ):
            return summarize(values)
        value = math.nan if self.aggregate is None else self.aggregate
        return Summary(len(values), value, 0.0, False, 0, value)


def model_args(ctx: Context, model: str, tokenizer: Path) -> dict[str, Any]:
    """lm-eval HF backend arguments for the merged, base or adapter model (local folders).

    A model larger than the memory budget (``--merge-memory``) is loaded by lm-eval's own
    big-model path: ``parallelize=True`` with the budget as ``max_cpu_memory`` (or, on an
    accelerator, ``max_memory_per_gpu``), so accelerate places what fits and offloads the rest,
    its offload folder a private temporary folder. The unmerged adapter model cannot go that
    way (peft cannot load an adapter onto a disk-offloaded model without rewriting its
    shards), so when its base exceeds the budget it is refused (:class:`MemoryRefusal`).
    """
    options = ctx.settings
    if model == "merged":
        if options.merged is None:
            raise HarnessError("no merged model")
        args: dict[str, Any] = {"pretrained": str(options.merged)}
    elif model == "base":
        if options.base is None:
            raise HarnessError("the benchmark thresholds need the base model: pass --base-model")
        args = {"pretrained": str(options.base)}
    else:
        if options.base is None or options.adapter is None:
            raise HarnessError(
                "the benchmark thresholds need the unmerged adapter model: pass --adapter"
                " (and --base-model)"
            )
        args = {"pretrained": str(options.base), "peft": str(options.adapter)}
    for key in ("pretrained", "peft"):
        if key in args:  # lm-eval hands these to transformers and peft unguarded
            refuse_remote_code(Path(args[key]), options.trust_remote_code)
    if "peft" in args:
        refuse_hostile_patterns(Path(args["peft"]), Path(args["pretrained"]))
    args.update(
        tokenizer=str(tokenizer),
        dtype=torch_dtype_name(options.dtype),
        trust_remote_code=options.trust_remote_code,
    )
    checkpoint = ctx.merged() if model == "merged" else ctx.base()
    size = _loaded_bytes(checkpoint.tensors.values(), options.dtype)
    budget = options.memory or default_budget(options.device)
    if size <= budget:
        return args
    if model == "adapter":
        raise MemoryRefusal(
            f"lm-eval would hold the unmerged adapter model whole ({format_size(size)}), beyond"
            f" the {format_size(budget)} memory budget, and peft cannot load an adapter onto"
            " lm-eval's disk-offloaded model; pass a larger --merge-memory (or use the"
            " perplexity gate, which streams it)"
        )
    args["parallelize"] = True
    args["offload_folder"] = str(scratch_dir(ctx) / "offload")
    if options.device.split(":")[0] == "cpu":
        args["max_cpu_memory"] = budget
    else:
        args["max_memory_per_gpu"] = budget
    return args


def _loaded_bytes(tensors: Any, dtype: str | None) -> int:
    """Bytes a checkpoint's tensors take once loaded in ``dtype`` (None: as stored)."""
    width = ITEMSIZE.get(dtype or "", 0)
    return sum(t.numel * (width or ITEMSIZE.get(t.dtype, 4)) for t in tensors)


def run_lm_eval(ctx: Context, model: str) -> dict[str, dict[str, MetricRun]]:
    """Evaluate every configured task on one model with ``lm_eval.simple_evaluate`` (cached).

    Returns task -> ``metric,filter`` -> :class:`MetricRun`. Any failure inside lm-eval becomes
    a HarnessError with a one-line cause, shared by every item that needs this model.
    """
    return ctx.memo(Key(f"lmeval:{model}"), lambda: _evaluate(ctx, model))


def _evaluate(ctx: Context, model: str) -> dict[str, dict[str, MetricRun]]:

    gate = ctx.settings.config
    if gate is None or gate.benchmark is None:
        raise HarnessError("no [benchmark] configuration")
    bench = gate.benchmark
    tokenizer, _ = resolve(ctx)
    args = model_args(ctx, model, tokenizer)
    restore = enforce_offline()
    try:
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager
            from lm_eval.tasks._yaml_loader import load_yaml
        except ImportError:
            raise HarnessError(
                f"the benchmark gate needs lm-eval: {install_hint('eval')}"
            ) from None
        manager = TaskManager(
            include_defaults=False, include_path=[str(p) for p in bench.include_path]
        )
        specs = []
        for task in bench.tasks:
            entry = manager.task_index.get(task)
            if entry is None or entry.yaml_path is None:
                raise ConfigError(
                    f"benchmark task {task!r} not found by lm-eval under"
                    f" {', '.join(str(p) for p in bench.include_path)}"
                )
            yaml_path = Path(entry.yaml_path)
            config = load_yaml(yaml_path, resolve_func=True)
            specs.append(resolve_task_paths(config, yaml_path, scratch_dir(ctx) / "datasets"))
        try:
            output = lm_eval.simple_evaluate(
                model="hf",
                model_args=args,
                tasks=specs,
                task_manager=manager,
                num_fewshot=bench.num_fewshot,
                batch_size=bench.batch_size,
                device=ctx.settings.device,
                limit=bench.limit,
                log_samples=True,
                bootstrap_iters=0,
            )
        except HarnessError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise HarnessError(
                f"lm-eval failed on the {model} model: {type(exc).__name__}: {first}"
            ) from None
    finally:
        restore()
    if not isinstance(output, dict):
        raise HarnessError(f"lm-eval returned no results for the {model} model")
    return parse_output(output, list(bench.tasks))


def parse_output(output: Mapping[str, Any], tasks: list[str]) -> dict[str, dict[str, MetricRun]]:
    """Per task, per ``metric,filter``: the aggregate, per-document values and direction."""
    parsed: dict[str, dict[str, MetricRun]] = {}
    results = output.get("results", {})
    directions = output.get("higher_is_better", {})
    samples = output.get("samples", {})
    for task in tasks:
        metrics: dict[str, MetricRun] = {}
        for key, value in dict(results.get(task, {})).items():
            if "," not in key or "_stderr" in key:
                continue
            name, filt = key.split(",", 1)
            aggregate = float(value) if isinstance(value, (int, float)) else None
            per_doc: dict[int, float] = {}
            for sample in samples.get(task, []) or []:
                if sample.get("filter", "none") != filt:
                    continue
                item = sample.get(name)
                if (isinstance(item, (int, float)) and not isinstance(item, bool)) or isinstance(
                    item, bool
                ):
                    per_doc[int(sample["doc_id"])] = float(item)
            hib = dict(directions.get(task, {})).get(name)
            metrics[key] = MetricRun(aggregate, per_doc, hib if isinstance(hib, bool) else None)
        parsed[task] = metrics
    return parsed


# ----------------------------------------------------------------------------- judgement


def evidence_from_runs(runs: Mapping[str, MetricRun], higher_is_better: bool) -> dict[str, Any]:
    """The sufficient statistics of one metric over the evaluated models (what the lock keeps)."""
    summaries = {model: run.summary() for model, run in runs.items()}
    pairs: dict[str, Any] = {}
    merged = runs.get("merged")
    for other in ("base", "adapter"):
        if merged is not None and other in runs and summaries["merged"].aggregate is None:
            pairs[other] = pair(merged.samples, runs[other].samples).to_json()
    return {
        "higher_is_better": higher_is_better,
        "models": {m: s.to_json() for m, s in summaries.items()},
        "pairs": pairs,
    }


def judge(
    name: str,
    evidence: Mapping[str, Any],
    threshold: Threshold,
    *,
    confidence: float,
    min_samples: int,
) -> tuple[Outcome, str, list[Decision]]:
    """Apply one metric's thresholds to its evidence: a pure function (no models, no files)."""
    hib = threshold.higher_is_better
    if hib is None:
        hib = bool(evidence.get("higher_is_better", True))
    models = {m: Summary.from_json(s) for m, s in dict(evidence.get("models", {})).items()}
    pairs = {m: Paired.from_json(p) for m, p in dict(evidence.get("pairs", {})).items()}
    merged = models["merged"]
    decisions: list[Decision] = []
    if threshold.floor is not None:
        decisions.append(decide_floor(merged, threshold.floor, hib, confidence))
    if threshold.max_drop is not None:
        if "base" not in models:
            decisions.append(Decision("max_drop", Outcome.FAILED, "base model not evaluated", {}))
        else:
            decisions.append(
                decide_drop(
                    pairs.get("base"), merged, models["base"], threshold.max_drop, hib, confidence
                )
            )
    if threshold.max_adapter_diff is not None:
        if "adapter" not in models:
            decisions.append(
                Decision("max_adapter_diff", Outcome.FAILED, "adapter model not evaluated", {})
            )
        else:
            decisions.append(
                decide_adapter(
                    pairs.get("adapter"),
                    merged,
                    models["adapter"],
                    threshold.max_adapter_diff,
                    confidence,
                )
            )
    outcome = combine_outcomes(decisions)
    head = f"{name} {merged.value:.4g} on {merged.n} docs"
    if not decisions:
        return Outcome.PASSED, f"{head} (no thresholds: recorded only)", decisions
    if outcome is Outcome.PASSED and merged.n < min_samples:
        text = "; ".join(d.text for d in decisions)
        return (
            Outcome.INCONCLUSIVE,
            f"{head}: too few documents to pass (min_samples {min_samples}): {text}",
            decisions,
        )
    shown = (
        [d for d in decisions if d.outcome is outcome]
        if outcome is not Outcome.PASSED
        else decisions
    )
    return outcome, f"{head}: " + "; ".join(d.text for d in shown), decisions
