"""The gate configuration: ``[tool.merge-harness]`` in pyproject.toml, or ``merge-harness.toml``.

Every key is validated eagerly with a one-line error that names the file and the key, so a typo
(``max_dorp``) is a usage error at startup, not a silently ignored threshold. Paths in the file
are relative to the file. ``KEYS``, ``BENCHMARK_KEYS``, ``THRESHOLD_KEYS`` and
``PERPLEXITY_KEYS`` are the full reference (the docs' tables are generated from them). The keys
shared with the command line are the knobs of :mod:`harness.run.knobs`; the command line wins.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import CheckpointError, ConfigError
from harness.io.files import MAX_JSON_BYTES, check_regular_file
from harness.run.knobs import KNOBS, KnobError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: The table in pyproject.toml.
PYPROJECT_TABLE = ("tool", "merge-harness")
STANDALONE = "merge-harness.toml"
DEFAULT_LOCK = "merge-harness.lock"
#: A tokenizer the harness builds itself (one character per token), for tiny test models only.
BUILTIN_TOKENIZER = "builtin:chars"
MODELS = ("merged", "base", "adapter")

#: Keys only the file can set -> one-line description.
FILE_KEYS: dict[str, str] = {
    "config_allow": "extra config.json keys a merge may change (list of strings)",
    "inconclusive_blocks": "whether an inconclusive check fails the gate (default false)",
    "confidence": "confidence level of every interval (default 0.95)",
    "lock": "the lock file (default merge-harness.lock beside this file; --merge-lock wins)",
    "tokenizer": "tokenizer folder for evaluation, or 'builtin:chars' for tiny test models",
    "plot": "where to write the per-layer weight-difference PNG",
    "benchmark": "lm-eval benchmark gate (table)",
    "perplexity": "fast perplexity gate (table)",
}
#: Top-level keys -> one-line description.
KEYS: dict[str, str] = {
    **{knob.key: f"{knob.help} ({knob.flag} wins)" for knob in KNOBS},
    **FILE_KEYS,
}
BENCHMARK_KEYS: dict[str, str] = {
    "include_path": "folder (or list of folders) of lm-eval YAML tasks",
    "tasks": "table: task name -> metric name -> thresholds",
    "models": "models to evaluate (default: those the thresholds need)",
    "limit": "evaluate only the first N documents of each task",
    "num_fewshot": "few-shot examples (default: the task's own, else 0)",
    "batch_size": "evaluation batch size (default 8)",
    "min_samples": "fewer documents than this can never pass (default 30)",
    "confidence": "confidence level of the benchmark intervals (default: top-level)",
}
THRESHOLD_KEYS: dict[str, str] = {
    "floor": "worst acceptable value (a minimum, or a maximum when lower is better)",
    "max_drop": "largest allowed loss against the base model",
    "max_adapter_diff": "largest allowed difference from the unmerged adapter model",
    "higher_is_better": "direction of the metric (default: what the task declares)",
    "min_samples": "per-metric override of benchmark.min_samples",
}
PERPLEXITY_KEYS: dict[str, str] = {
    "text": "local text file (UTF-8)",
    "max_ratio": "largest allowed perplexity(merged) / perplexity(adapter) (default 1.01)",
    "max_base_ratio": "largest allowed perplexity(merged) / perplexity(base) (optional)",
    "max_tokens": "tokens of the text to use (default 4096)",
    "window": "tokens per window (default: the model's context, at most 512)",
}


@dataclass(frozen=True)
class Threshold:
    """The thresholds of one metric of one task."""

    floor: float | None = None
    max_drop: float | None = None
    max_adapter_diff: float | None = None
    higher_is_better: bool | None = None
    min_samples: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON view without unset keys."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class BenchmarkConfig:
    """The lm-eval benchmark gate."""

    include_path: tuple[Path, ...]
    tasks: dict[str, dict[str, Threshold]]
    models: tuple[str, ...]
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    min_samples: int = 30
    confidence: float = 0.95


@dataclass(frozen=True)
class PerplexityConfig:
    """The fast perplexity gate."""

    text: Path
    max_ratio: float = 1.01
    max_base_ratio: float | None = None
    max_tokens: int = 4096
    window: int | None = None

    @property
    def models(self) -> tuple[str, ...]:
        """The models this gate evaluates."""
        return ("merged", "adapter") + (("base",) if self.max_base_ratio is not None else ())


@dataclass(frozen=True)
class GateConfig:
    """The validated configuration of one run (empty when there is no configuration file)."""

    source: Path | None = None
    #: Knob values the file sets (validated), by ``Settings`` field name.
    knobs: dict[str, Any] = field(default_factory=dict)
    config_allow: frozenset[str] = frozenset()
    inconclusive_blocks: bool = False
    confidence: float = 0.95
    #: The lock file named by the configuration (None: default location).
    lock: Path | None = None
    tokenizer: str | None = None
    plot: Path | None = None
    benchmark: BenchmarkConfig | None = None
    perplexity: PerplexityConfig | None = None

    @property
    def folder(self) -> Path | None:
        """The folder relative paths are resolved against."""
        return None if self.source is None else self.source.parent


# ----------------------------------------------------------------------------- reading


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file of bounded size; raise ConfigError naming the file."""
    try:
        size = check_regular_file(path, confined=False)
        if size > MAX_JSON_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too large for a configuration file")
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: bad TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: bad TOML: nested too deeply") from None


def _pyproject_table(data: Mapping[str, Any]) -> Any:
    tool = data.get(PYPROJECT_TABLE[0])
    return tool.get(PYPROJECT_TABLE[1]) if isinstance(tool, Mapping) else None


def find(
    explicit: Path | None, rootdir: Path, cwd: Path | None = None
) -> tuple[Path | None, dict[str, Any]]:
    """The configuration file and its table: ``explicit``, else pyproject.toml, else standalone.

    ``explicit`` may be a pyproject.toml (its ``[tool.merge-harness]`` table is used) or a
    standalone file (its top level is the table; a ``[tool.merge-harness]`` table in it is
    accepted too). Without it, ``rootdir`` is searched, then ``cwd`` (pytest's rootdir can be
    an ancestor of the model folders when they are passed as separate arguments).
    """
    if explicit is None:
        for folder in dict.fromkeys([rootdir, *([cwd] if cwd is not None else [])]):
            found = _find_in(folder)
            if found[0] is not None:
                return found
        return None, {}
    if not explicit.is_file():
        raise ConfigError(f"--merge-config {explicit}: no such file")
    data = read_toml(explicit)
    table = _pyproject_table(data)
    if explicit.name == "pyproject.toml":
        if table is None:
            raise ConfigError(f"{explicit}: no [tool.merge-harness] table")
    elif table is None:
        table = data
    if not isinstance(table, dict):
        raise ConfigError(f"{explicit}: [tool.merge-harness] must be a table")
    return explicit, table


def _find_in(rootdir: Path) -> tuple[Path | None, dict[str, Any]]:
    pyproject = rootdir / "pyproject.toml"
    if pyproject.is_file():
        table = _pyproject_table(read_toml(pyproject))
        if table is not None:
            if not isinstance(table, dict):
                raise ConfigError(f"{pyproject}: [tool.merge-harness] must be a table")
            return pyproject, table
    standalone = rootdir / STANDALONE
    if standalone.is_file():
        data = read_toml(standalone)
        table = _pyproject_table(data)
        return standalone, table if isinstance(table, dict) else data
    return None, {}


# ----------------------------------------------------------------------------- validation


class _Validator:
    """Typed getters that raise one-line ConfigErrors naming the file and the dotted key."""

    def __init__(self, source: Path | None) -> None:
        self.source = source

    def error(self, key: str, text: str) -> ConfigError:
        where = f"{self.source}: " if self.source else ""
        return ConfigError(f"{where}{key}: {text}")

    def unknown(self, table: Mapping[str, Any], known: Mapping[str, str], prefix: str) -> None:
        extra = sorted(set(table) - set(known))
        if extra:
            names = ", ".join(f"{prefix}{k}" for k in extra)
            raise self.error(names, f"unknown key (known: {', '.join(known)})")

    def table(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, got {type(value).__name__}")
        return value

    def number(
        self,
        value: Any,
        key: str,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise self.error(key, f"must be a number, got {value!r}")
        number = float(value)
        if low is not None and (number < low or (low_open and number == low)):
            raise self.error(key, f"must be {'>' if low_open else '>='} {low:g}, got {value!r}")
        if high is not None and (number > high or (high_open and number == high)):
            raise self.error(key, f"must be {'<' if high_open else '<='} {high:g}, got {value!r}")
        return number

    def integer(self, value: Any, key: str, *, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {value!r}")
        if value < low:
            raise self.error(key, f"must be >= {low}, got {value}")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        return value

    def strings(self, value: Any, key: str) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"must be a list of strings, got {value!r}")
        return list(value)

    def path(self, value: Any, key: str, *, must_exist: str | None = None) -> Path:
        text = self.string(value, key)
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = (self.source.parent if self.source else Path.cwd()) / path
        path = path.absolute()
        if must_exist == "file" and not path.is_file():
            raise self.error(key, f"{text}: no such file")
        if must_exist == "dir" and not path.is_dir():
            raise self.error(key, f"{text}: no such folder")
        return path


def parse(table: Mapping[str, Any], source: Path | None) -> GateConfig:
    """Validate a ``[tool.merge-harness]`` table into a :class:`GateConfig`."""
    v = _Validator(source)
    v.unknown(table, KEYS, "")
    knobs: dict[str, Any] = {}
    for knob in KNOBS:
        if knob.key in table:
            try:
                knobs[knob.name] = knob.parse(table[knob.key])
            except KnobError as exc:
                raise v.error(knob.key, str(exc)) from None
    allow: frozenset[str] = frozenset()
    if "config_allow" in table:
        allow = frozenset(v.strings(table["config_allow"], "config_allow"))
    blocks = False
    if "inconclusive_blocks" in table:
        blocks = v.boolean(table["inconclusive_blocks"], "inconclusive_blocks")
    confidence = 0.95
    if "confidence" in table:
        confidence = v.number(table["confidence"], "confidence", low=0.5, high=1.0, high_open=True)
    lock = v.path(table["lock"], "lock") if "lock" in table else None
    tokenizer: str | None = None
    if "tokenizer" in table:
        text = v.string(table["tokenizer"], "tokenizer")
        tokenizer = (
            text if text == BUILTIN_TOKENIZER else str(v.path(text, "tokenizer", must_exist="dir"))
        )
    plot = v.path(table["plot"], "plot") if "plot" in table else None
    benchmark = None
    if "benchmark" in table:
        benchmark = _benchmark(v, v.table(table["benchmark"], "benchmark"), confidence)
    perplexity = None
    if "perplexity" in table:
        perplexity = _perplexity(v, v.table(table["perplexity"], "perplexity"))
    return GateConfig(
        source=source,
        knobs=knobs,
        config_allow=allow,
        inconclusive_blocks=blocks,
        confidence=confidence,
        lock=lock,
        tokenizer=tokenizer,
        plot=plot,
        benchmark=benchmark,
        perplexity=perplexity,
    )


def _threshold(v: _Validator, value: Any, key: str) -> Threshold:
    table = v.table(value, key)
    v.unknown(table, THRESHOLD_KEYS, key + ".")
    floor = v.number(table["floor"], key + ".floor") if "floor" in table else None
    drop = v.number(table["max_drop"], key + ".max_drop") if "max_drop" in table else None
    diff = None
    if "max_adapter_diff" in table:
        diff = v.number(table["max_adapter_diff"], key + ".max_adapter_diff", low=0.0)
    hib = None
    if "higher_is_better" in table:
        hib = v.boolean(table["higher_is_better"], key + ".higher_is_better")
    min_samples = None
    if "min_samples" in table:
        min_samples = v.integer(table["min_samples"], key + ".min_samples", low=1)
    return Threshold(floor, drop, diff, hib, min_samples)


def _benchmark(v: _Validator, table: dict[str, Any], confidence: float) -> BenchmarkConfig:
    v.unknown(table, BENCHMARK_KEYS, "benchmark.")
    if "include_path" not in table:
        raise v.error("benchmark.include_path", "missing (the folder of your lm-eval YAML tasks)")
    raw_paths = table["include_path"]
    paths = tuple(
        v.path(p, "benchmark.include_path", must_exist="dir")
        for p in (raw_paths if isinstance(raw_paths, list) else [raw_paths])
    )
    if not paths:
        raise v.error("benchmark.include_path", "must name at least one folder")
    if "tasks" not in table:
        raise v.error("benchmark.tasks", "missing (a table: task -> metric -> thresholds)")
    tasks: dict[str, dict[str, Threshold]] = {}
    for task, metrics in v.table(table["tasks"], "benchmark.tasks").items():
        key = f"benchmark.tasks.{task}"
        metrics = v.table(metrics, key)
        if not metrics:
            raise v.error(key, "list at least one metric, e.g. acc = { floor = 0.5 }")
        tasks[task] = {
            metric: _threshold(v, value, f"{key}.{metric}") for metric, value in metrics.items()
        }
    if not tasks:
        raise v.error("benchmark.tasks", "name at least one task")
    needed = {"merged"}
    for metrics in tasks.values():
        for threshold in metrics.values():
            if threshold.max_drop is not None:
                needed.add("base")
            if threshold.max_adapter_diff is not None:
                needed.add("adapter")
    if "models" in table:
        models = v.strings(table["models"], "benchmark.models")
        unknown = sorted(set(models) - set(MODELS))
        if unknown:
            raise v.error(
                "benchmark.models",
                f"unknown model(s) {', '.join(unknown)} (known: {', '.join(MODELS)})",
            )
        missing = sorted(needed - set(models))
        if missing:
            raise v.error("benchmark.models", f"thresholds need {', '.join(missing)} too")
        chosen = tuple(m for m in MODELS if m in models)
    else:
        chosen = tuple(m for m in MODELS if m in needed)
    limit = v.integer(table["limit"], "benchmark.limit", low=1) if "limit" in table else None
    fewshot = None
    if "num_fewshot" in table:
        fewshot = v.integer(table["num_fewshot"], "benchmark.num_fewshot", low=0)
    batch = v.integer(table.get("batch_size", 8), "benchmark.batch_size", low=1)
    min_samples = v.integer(table.get("min_samples", 30), "benchmark.min_samples", low=1)
    if "confidence" in table:
        confidence = v.number(
            table["confidence"], "benchmark.confidence", low=0.5, high=1.0, high_open=True
        )
    return BenchmarkConfig(paths, tasks, chosen, limit, fewshot, batch, min_samples, confidence)


def _perplexity(v: _Validator, table: dict[str, Any]) -> PerplexityConfig:
    v.unknown(table, PERPLEXITY_KEYS, "perplexity.")
    if "text" not in table:
        raise v.error("perplexity.text", "missing (a local UTF-8 text file)")
    text = v.path(table["text"], "perplexity.text", must_exist="file")
    ratio = v.number(table.get("max_ratio", 1.01), "perplexity.max_ratio", low=1.0)
    base_ratio = None
    if "max_base_ratio" in table:
        base_ratio = v.number(
            table["max_base_ratio"], "perplexity.max_base_ratio", low=0.0, low_open=True
        )
    max_tokens = v.integer(table.get("max_tokens", 4096), "perplexity.max_tokens", low=2)
    window = v.integer(table["window"], "perplexity.window", low=2) if "window" in table else None
    return PerplexityConfig(text, ratio, base_ratio, max_tokens, window)
