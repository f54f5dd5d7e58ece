"""The gate configuration (discovery, strict validation, precedence) and the pure gate decision."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import benchmark, lock
from harness.config import BUILTIN_TOKENIZER, parse
from harness.context import Options
from harness.errors import ConfigError
from harness.gate import decide, load_settings
from harness.result import Check, CheckResult, Kind, Outcome

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TASKS = FIXTURES / "tasks"


def _write(folder: Path, text: str, name: str = "merge-harness.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _load(folder: Path, text: str | None = None, **options: object) -> Options:
    if text is not None:
        _write(folder, text)
    opts = Options(**options)  # type: ignore[arg-type]
    load_settings(opts, folder)
    return opts


def test_no_configuration_adds_no_gate_items(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = _load(tmp_path)
    assert options.gate is not None and options.gate.source is None
    assert benchmark.checks(options) == []
    # No lock file, none named, not updating: no lock item either.
    assert lock.checks(options) == []
    assert options.lock_path == tmp_path / "merge-harness.lock"


def test_pyproject_table_is_found_and_paths_are_relative_to_it(tmp_path):
    (tmp_path / "text.txt").write_text("hello world", encoding="utf-8")
    _write(
        tmp_path,
        '[project]\nname = "x"\n\n[tool.merge-harness]\ninconclusive_blocks = true\n'
        '[tool.merge-harness.perplexity]\ntext = "text.txt"\nmax_ratio = 1.05\n',
        "pyproject.toml",
    )
    _write(tmp_path, "this = 'is ignored: pyproject wins'\n")
    options = _load(tmp_path)
    gate = options.gate
    assert gate is not None and gate.source == tmp_path / "pyproject.toml"
    assert gate.inconclusive_blocks and options.settings["inconclusive_blocks"] is True
    assert gate.perplexity is not None and gate.perplexity.text == tmp_path / "text.txt"
    assert gate.perplexity.models == ("merged", "adapter")
    assert [c.id for c in benchmark.checks(options)] == ["merge::benchmark::perplexity"]


def test_standalone_file_is_found_when_pyproject_has_no_table(tmp_path):
    _write(tmp_path, '[project]\nname = "x"\n', "pyproject.toml")
    options = _load(tmp_path, "ulp_tolerance = 2.5\nconfig_allow = ['rope_scaling']\n")
    assert options.gate is not None and options.gate.source == tmp_path / "merge-harness.toml"
    assert options.ulp_tolerance == 2.5
    assert options.settings["config_allow"] == ["rope_scaling"]


def test_explicit_config_and_command_line_precedence(tmp_path):
    config = _write(
        tmp_path,
        "ulp_tolerance = 3.0\nexamples = 7\ntimeout = 60\ndevice = 'cpu'\ndtype = 'bf16'\n"
        "checks = ['structure', 'hash']\nlock = 'locks/approved.lock'\n",
        "gate.toml",
    )
    # The command line set --merge-ulp 0.5 and --merge-checks hash: those win.
    options = Options(config_path=config, ulp_tolerance=0.5, families=frozenset({"hash"}))
    load_settings(options, tmp_path / "elsewhere")
    assert options.ulp_tolerance == 0.5 and options.families == frozenset({"hash"})
    assert options.examples == 7 and options.check_timeout == 60.0 and options.dtype == "BF16"
    assert options.lock_path == tmp_path / "locks" / "approved.lock"
    assert options.gate is not None and options.gate.lock_requested
    # A named lock file is checked even before it exists (the check then says how to record it).
    assert [c.id for c in lock.checks(options)] == ["merge::lock::digests"]


def test_benchmark_models_follow_the_thresholds(tmp_path):
    text = (
        f"tokenizer = '{BUILTIN_TOKENIZER}'\n[benchmark]\ninclude_path = '{TASKS.as_posix()}'\n"
        "[benchmark.tasks.tiny_choice]\nacc = {floor = 0.3}\nacc_norm = {max_drop = 0.1}\n"
    )
    options = _load(tmp_path, text)
    assert options.gate is not None and options.gate.benchmark is not None
    assert options.gate.benchmark.models == ("merged", "base")
    ids = [c.id for c in benchmark.checks(options)]
    assert ids == ["merge::benchmark::tiny_choice.acc", "merge::benchmark::tiny_choice.acc_norm"]
    assert all(c.kind is Kind.BENCHMARK for c in benchmark.checks(options))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ulp_tolerence = 1\n", "ulp_tolerence: unknown key"),
        ("ulp_tolerance = -1\n", "ulp_tolerance: must be >= 0"),
        ("ulp_tolerance = 'one'\n", "ulp_tolerance: must be a number"),
        ("examples = 0\n", "examples: must be >= 1"),
        ("inconclusive_blocks = 'yes'\n", "inconclusive_blocks: must be true or false"),
        ("confidence = 1.0\n", "confidence: must be < 1"),
        ("checks = ['structure', 'wieghts']\n", "checks: unknown family wieghts"),
        ("tokenizer = 'no/such/folder'\n", "tokenizer: no/such/folder: no such folder"),
        ("[perplexity]\nmax_ratio = 1.1\n", "perplexity.text: missing"),
        ("[perplexity]\ntext = 'missing.txt'\n", "perplexity.text: missing.txt: no such file"),
        ("[benchmark]\ntasks = {}\n", "benchmark.include_path: missing"),
        (
            f"[benchmark]\ninclude_path = '{TASKS.as_posix()}'\n"
            "[benchmark.tasks.tiny_choice]\nacc = {floor = 0.5, max_dorp = 0.1}\n",
            "benchmark.tasks.tiny_choice.acc.max_dorp: unknown key",
        ),
        (
            f"[benchmark]\ninclude_path = '{TASKS.as_posix()}'\n"
            "[benchmark.tasks.tiny_choice]\nacc = {floor = 'high'}\n",
            "benchmark.tasks.tiny_choice.acc.floor: must be a number",
        ),
        (
            f"[benchmark]\ninclude_path = '{TASKS.as_posix()}'\nmodels = ['merged']\n"
            "[benchmark.tasks.tiny_choice]\nacc = {max_adapter_diff = 0.1}\n",
            "benchmark.models: thresholds need adapter too",
        ),
        (
            f"[benchmark]\ninclude_path = '{TASKS.as_posix()}'\n[benchmark.tasks]\n",
            "benchmark.tasks: name at least one task",
        ),
        ("[benchmark\n", "bad TOML"),
    ],
)
def test_invalid_configuration_is_one_line_naming_file_and_key(tmp_path, text, expected):
    _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(Options(), tmp_path)
    message = str(info.value)
    assert expected in message
    assert "merge-harness.toml" in message and "\n" not in message


def test_explicit_pyproject_without_table_is_refused(tmp_path):
    path = _write(tmp_path, '[project]\nname = "x"\n', "pyproject.toml")
    with pytest.raises(ConfigError, match=r"no \[tool.merge-harness\] table"):
        load_settings(Options(config_path=path), tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(Options(config_path=tmp_path / "nope.toml"), tmp_path)


def test_parse_is_usable_without_a_file():
    gate = parse({"inconclusive_blocks": True, "confidence": 0.9}, None)
    assert gate.inconclusive_blocks and gate.confidence == 0.9 and gate.folder is None


def _check(name: str) -> Check:
    return Check("benchmark", name, Kind.BENCHMARK, name, lambda ctx: CheckResult.passed("x"))


def test_decide_is_a_pure_function_of_results_and_configuration():
    suite = [_check("a"), _check("b"), _check("c"), _check("d")]
    results = {
        "merge::benchmark::a": CheckResult.passed("fine", reused=True),
        "merge::benchmark::b": CheckResult(Outcome.INCONCLUSIVE, "too few"),
        "merge::benchmark::c": CheckResult.skipped("n/a"),
    }
    lenient = decide(suite, results, inconclusive_blocks=False)
    assert lenient.passed and lenient.missing == ["merge::benchmark::d"]
    assert lenient.reused == ["merge::benchmark::a"]
    assert lenient.counts == {"passed": 1, "inconclusive": 1, "skipped": 1}
    strict = decide(suite, results, inconclusive_blocks=True)
    assert not strict.passed and "inconclusive" in strict.reasons[0]
    results["merge::benchmark::d"] = CheckResult.failed("floor missed")
    failed = decide(suite, results, inconclusive_blocks=False)
    assert not failed.passed and failed.reasons == ["merge::benchmark::d: floor missed"]
    # Same inputs, same verdict.
    assert decide(suite, results, False).to_json() == failed.to_json()


def test_bad_configuration_is_a_usage_error(pytester, tiny_llama):
    pytester.makefile(".toml", **{"merge-harness": "[benchmark]\nlimit = 5\n"})
    result = pytester.runpytest("--merged-model", str(tiny_llama.merged))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if "benchmark.include_path" in line]
    assert len(errors) == 1 and "missing" in errors[0]
    assert "Traceback" not in result.stderr.str()
