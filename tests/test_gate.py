"""The gate configuration (discovery, strict validation, precedence) and the pure gate decision."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.checks import benchmark, lock
from harness.errors import ConfigError
from harness.gate.decide import decide
from harness.run.check import Check
from harness.run.config import BUILTIN_TOKENIZER, parse
from harness.run.knobs import KNOBS
from harness.run.result import BenchmarkRecord, CheckResult, Family, Outcome
from harness.run.settings import Request, Settings, resolve

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TASKS = FIXTURES / "tasks"


def _write(folder: Path, text: str, name: str = "merge-harness.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _load(folder: Path, text: str | None = None, request: Request | None = None) -> Settings:
    if text is not None:
        _write(folder, text)
    return resolve(request or Request(), rootdir=folder, cwd=folder)


def test_no_configuration_adds_no_gate_items(tmp_path):
    settings = _load(tmp_path)
    assert settings.config.source is None
    assert benchmark.checks(settings) == []
    # No lock file, none named, not updating: no lock item either.
    assert lock.checks(settings) == []
    assert settings.lock_path == tmp_path / "merge-harness.lock"


def test_pyproject_table_is_found_and_paths_are_relative_to_it(tmp_path):
    (tmp_path / "text.txt").write_text("hello world", encoding="utf-8")
    _write(
        tmp_path,
        '[project]\nname = "x"\n\n[tool.merge-harness]\ninconclusive_blocks = true\n'
        '[tool.merge-harness.perplexity]\ntext = "text.txt"\nmax_ratio = 1.05\n',
        "pyproject.toml",
    )
    _write(tmp_path, "this = 'is ignored: pyproject wins'\n")
    settings = _load(tmp_path)
    gate = settings.config
    assert gate.source == tmp_path / "pyproject.toml"
    assert gate.inconclusive_blocks
    assert gate.perplexity is not None and gate.perplexity.text == tmp_path / "text.txt"
    assert gate.perplexity.models == ("merged", "adapter")
    assert [c.id for c in benchmark.checks(settings)] == ["merge::benchmark::perplexity"]


def test_standalone_file_is_found_when_pyproject_has_no_table(tmp_path):
    _write(tmp_path, '[project]\nname = "x"\n', "pyproject.toml")
    settings = _load(tmp_path, "ulp_tolerance = 2.5\nconfig_allow = ['rope_scaling']\n")
    assert settings.config.source == tmp_path / "merge-harness.toml"
    assert settings.ulp_tolerance == 2.5
    assert settings.config.config_allow == frozenset({"rope_scaling"})


def test_explicit_config_and_command_line_precedence(tmp_path):
    config = _write(
        tmp_path,
        "ulp_tolerance = 3.0\nexamples = 7\ntimeout = 60\ndevice = 'cpu'\ndtype = 'bf16'\n"
        "checks = ['structure', 'hash']\nlock = 'locks/approved.lock'\n",
        "gate.toml",
    )
    # The command line set --merge-ulp 0.5 and --merge-checks hash: those win.
    request = Request(
        config_path=config,
        overrides={"ulp_tolerance": 0.5, "families": frozenset({Family.HASH})},
    )
    settings = resolve(request, rootdir=tmp_path / "elsewhere", cwd=tmp_path)
    assert settings.ulp_tolerance == 0.5 and settings.families == frozenset({Family.HASH})
    assert settings.examples == 7 and settings.timeout == 60.0 and settings.dtype == "BF16"
    assert settings.lock_path == tmp_path / "locks" / "approved.lock"
    assert settings.lock_requested
    # A named lock file is checked even before it exists (the check then says how to record it).
    assert [c.id for c in lock.checks(settings)] == ["merge::lock::digests"]


def test_settings_are_immutable(tmp_path):
    settings = _load(tmp_path)
    with pytest.raises(AttributeError):
        settings.ulp_tolerance = 5.0  # type: ignore[misc]


#: Per knob: the file's value, and a command-line value equal to the default.
FILE_VALUES = {
    "families": ("checks = ['hash']", "structure,security,weights,hash,behaviour,lock,benchmark"),
    "ulp_tolerance": ("ulp_tolerance = 1000", "1"),
    "examples": ("examples = 3", "20"),
    "timeout": ("timeout = 5", None),
    "device": ("device = 'cuda'", "cpu"),
    "dtype": ("dtype = 'bf16'", None),
    "memory": ("memory = '1GiB'", None),
}


def test_every_knob_has_a_precedence_case():
    assert set(FILE_VALUES) == {knob.name for knob in KNOBS}


@pytest.mark.parametrize("knob", KNOBS, ids=lambda knob: knob.flag)
def test_command_line_equal_to_the_default_beats_the_file(pytester, tiny_llama, knob):
    """An explicit flag wins over the configuration file, even when it repeats the default."""
    line, flag_value = FILE_VALUES[knob.name]
    if flag_value is None:  # no default to repeat: any explicit value must win
        flag_value = {"timeout": "600", "dtype": "fp32", "memory": "3GiB"}[knob.name]
    pytester.makefile(".toml", **{"merge-harness": line + "\n"})
    pytester.makeconftest(
        f"""
        import json
        from harness.plugin.state import STATE_KEY

        def pytest_collection_finish(session):
            settings = session.config.stash[STATE_KEY].settings
            value = getattr(settings, {knob.name!r})
            if isinstance(value, frozenset):
                value = sorted(v.value for v in value)
            print("SETTING=" + json.dumps(value))
        """
    )
    result = pytester.runpytest(
        "--collect-only", "-q", "--merged-model", str(tiny_llama.merged), knob.flag, flag_value
    )
    printed = [ln for ln in result.outlines if ln.startswith("SETTING=")]
    assert printed, result.stdout.str()
    expected = knob.parse(flag_value)
    if isinstance(expected, frozenset):
        expected = sorted(v.value for v in expected)
    assert printed[0] == f"SETTING={__import__('json').dumps(expected)}"
    # Without the flag, the file's value applies (device = 'cuda' on a machine without CUDA
    # is then a usage error that names it).
    plain = pytester.runpytest("--collect-only", "-q", "--merged-model", str(tiny_llama.merged))
    from_file = [ln for ln in plain.outlines if ln.startswith("SETTING=")]
    if from_file:
        assert from_file[0] != printed[0]
    else:
        assert plain.ret == pytest.ExitCode.USAGE_ERROR and knob.name == "device"
        assert "--merge-device cuda: CUDA is not available" in plain.stderr.str()


def test_issue_example_command_line_wins_over_every_file_key(tmp_path):
    """device = cuda, ulp_tolerance = 1000, examples = 3 lose to the command line."""
    _write(tmp_path, "device = 'cuda'\nulp_tolerance = 1000\nexamples = 3\n")
    request = Request(overrides={"device": "cpu", "ulp_tolerance": 1.0, "examples": 20})
    settings = resolve(request, rootdir=tmp_path, cwd=tmp_path)
    assert (settings.device, settings.ulp_tolerance, settings.examples) == ("cpu", 1.0, 20)


def test_benchmark_models_follow_the_thresholds(tmp_path):
    text = (
        f"tokenizer = '{BUILTIN_TOKENIZER}'\n[benchmark]\ninclude_path = '{TASKS.as_posix()}'\n"
        "[benchmark.tasks.tiny_choice]\nacc = {floor = 0.3}\nacc_norm = {max_drop = 0.1}\n"
    )
    settings = _load(tmp_path, text)
    assert settings.config.benchmark is not None
    assert settings.config.benchmark.models == ("merged", "base")
    ids = [c.id for c in benchmark.checks(settings)]
    assert ids == ["merge::benchmark::tiny_choice.acc", "merge::benchmark::tiny_choice.acc_norm"]
    assert all(c.family is Family.BENCHMARK for c in benchmark.checks(settings))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ulp_tolerence = 1\n", "ulp_tolerence: unknown key"),
        ("ulp_tolerance = -1\n", "ulp_tolerance: must be a finite number >= 0"),
        ("ulp_tolerance = 'one'\n", "ulp_tolerance: must be a number"),
        ("examples = 0\n", "examples: must be >= 1"),
        ("inconclusive_blocks = 'yes'\n", "inconclusive_blocks: must be true or false"),
        ("confidence = 1.0\n", "confidence: must be < 1"),
        ("checks = ['structure', 'wieghts']\n", "checks: unknown family wieghts"),
        ("device = 'gpu'\n", "device: must be cpu, cuda, cuda:N, mps or xpu"),
        ("dtype = 'int8'\n", "dtype: unknown dtype name"),
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
        _load(tmp_path)
    message = str(info.value)
    assert expected in message
    assert "merge-harness.toml" in message and "\n" not in message


def test_explicit_pyproject_without_table_is_refused(tmp_path):
    path = _write(tmp_path, '[project]\nname = "x"\n', "pyproject.toml")
    with pytest.raises(ConfigError, match=r"no \[tool.merge-harness\] table"):
        _load(tmp_path, request=Request(config_path=path))
    with pytest.raises(ConfigError, match="no such file"):
        _load(tmp_path, request=Request(config_path=tmp_path / "nope.toml"))


def test_parse_is_usable_without_a_file():
    gate = parse({"inconclusive_blocks": True, "confidence": 0.9}, None)
    assert gate.inconclusive_blocks and gate.confidence == 0.9 and gate.folder is None


def _check(name: str) -> Check:
    return Check(Family.BENCHMARK, name, name, lambda ctx: CheckResult.passed("x"))


def test_decide_is_a_pure_function_of_results_and_configuration():
    suite = [_check("a"), _check("b"), _check("c"), _check("d")]
    reused = CheckResult.passed("fine")
    reused.record = BenchmarkRecord("f", {}, 1.0, reused=True)
    results = {
        "merge::benchmark::a": reused,
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
