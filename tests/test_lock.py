"""The lock file: its format, the adapter digest, and every transition through the plugin."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from support.checkpoints import copy_checkpoint, rewrite

from harness.errors import ConfigError
from harness.gate.lockfile import FORMAT, Lock, dumps, read_lock, write_lock
from harness.io.adapter import Adapter
from harness.stream.hashing import adapter_digest

# Imported before any in-process pytester run: pytester removes modules first imported during a
# run (tests/conftest.py imports datasets, which cannot be imported twice, for the same reason).
pytest.importorskip("lm_eval")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _lock() -> Lock:
    return Lock(
        digests={"merged": "a" * 64, "base": "b" * 64, "adapter": "c" * 64},
        merged_tensors={
            "model.layers.0.self_attn.q_proj.weight": "d" * 64,
            'odd "name" with spaces and ünïcode': "e" * 64,
        },
        harness="0.1.0",
        libraries={"torch": "2.13.0", "lm-eval": "0.4.13"},
        benchmarks={
            "merge::benchmark::task.acc": {
                "fingerprint": "f" * 64,
                "outcome": "passed",
                "value": 0.5,
                "evidence": {
                    "higher_is_better": True,
                    "models": {"merged": {"n": 40, "mean": 0.5, "sd": 0.5, "binary": True}},
                    "pairs": {"adapter": {"n": 40, "mean": 0.0, "sd": 0.0, "binary": True}},
                },
            }
        },
    )


@pytest.mark.parametrize("name", ["merge-harness.lock", "merge-harness.lock.toml"])
def test_lock_round_trips_in_json_and_toml(tmp_path, name):
    lock = _lock()
    path = tmp_path / name
    write_lock(path, lock)
    again = read_lock(path)
    assert again is not None and again.to_json() == lock.to_json()
    text = path.read_text(encoding="utf-8")
    if name.endswith(".toml"):
        assert tomllib.loads(text)["format"] == FORMAT
        assert "[digests]" in text
    else:
        assert json.loads(text)["format"] == FORMAT
    # Deterministic: the same lock gives the same bytes.
    assert dumps(lock, toml=name.endswith(".toml")) == text


def test_lock_is_sorted_with_one_value_per_line(tmp_path):
    text = dumps(_lock())
    lines = text.splitlines()
    tensor_lines = [ln for ln in lines if ln.strip().startswith('"model.layers.0')]
    assert len(tensor_lines) == 1 and tensor_lines[0].strip().endswith(f'"{"d" * 64}",')
    top = [ln.split('"')[1] for ln in lines if ln.startswith('  "')]
    assert top == sorted(top)
    toml = dumps(_lock(), toml=True)
    assert toml.splitlines()[0] == 'format = "merge-harness.lock/1"'


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "bad JSON lock file"),
        ('{"format": "other/9"}', "unsupported lock format"),
        (f'{{"format": "{FORMAT}", "digests": {{}}}}', "digests.merged missing"),
        (f'{{"format": "{FORMAT}", "digests": {{"merged": "x", "weird": "y"}}}}', "unknown digest"),
    ],
)
def test_malformed_lock_is_a_one_line_error(tmp_path, content, expected):
    path = tmp_path / "merge-harness.lock"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_lock(path)
    assert expected in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert read_lock(tmp_path / "absent.lock") is None


def test_adapter_digest_ignores_where_the_base_lived_but_not_what_the_adapter_is(
    tmp_path, tiny_llama
):
    original = adapter_digest(Adapter.open(tiny_llama.adapter))
    moved = copy_checkpoint(tiny_llama.adapter, tmp_path / "moved")
    config_path = moved / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "/somewhere/else/entirely"
    (moved / "README.md").write_text("notes that do not change the adapter")
    config_path.write_text(json.dumps(config, indent=4))
    assert adapter_digest(Adapter.open(moved)) == original
    config["lora_alpha"] = config["lora_alpha"] * 2
    config_path.write_text(json.dumps(config))
    assert adapter_digest(Adapter.open(moved)) != original


# ----------------------------------------------------------------------------- transitions

LOCK_CONFIG = """
tokenizer = "builtin:chars"

[perplexity]
text = "{text}"
max_ratio = 1.01

[benchmark]
include_path = "{tasks}"
limit = 40

[benchmark.tasks.tiny_choice]
acc = {{ floor = 0.2 }}
"""


def _run(pytester, models, *extra):
    return pytester.runpytest(
        "--merged-model",
        str(models["merged"]),
        "--base-model",
        str(models["base"]),
        "--adapter",
        str(models["adapter"]),
        "--merge-checks",
        "hash,lock,benchmark",
        "--merge-report",
        "report.json",
        *extra,
    )


def _report(pytester):
    return json.loads((pytester.path / "report.json").read_text())


def _by_id(report):
    return {c["id"]: c for c in report["checks"]}


def test_lock_transitions_record_reuse_change_and_approve(pytester, tiny_llama):
    pytester.makefile(
        ".toml",
        **{
            "merge-harness": LOCK_CONFIG.format(
                text=(FIXTURES / "text" / "sample.txt").as_posix(),
                tasks=(FIXTURES / "tasks").as_posix(),
            )
        },
    )
    models = {"merged": tiny_llama.merged, "base": tiny_llama.base, "adapter": tiny_llama.adapter}
    lock_path = pytester.path / "merge-harness.lock"

    # 1. No lock yet: the run evaluates, and records a lock only because it was asked to.
    first = _run(pytester, models, "--update-merge-lock")
    assert first.ret == 0
    first.stdout.fnmatch_lines(["*no lock file merge-harness.lock yet*", "lock: recorded *"])
    recorded = json.loads(lock_path.read_text())
    assert recorded["digests"]["merged"] == _report(pytester)["digests"]["merged"]
    assert set(recorded["benchmarks"]) == {
        "merge::benchmark::perplexity",
        "merge::benchmark::tiny_choice.acc",
    }
    checks = _by_id(_report(pytester))
    assert not checks["merge::benchmark::tiny_choice.acc"]["record"]["reused"]
    locked_bytes = lock_path.read_bytes()

    # 2. Unchanged digests: recorded results are reused, the evaluation is skipped, the summary
    #    says so, and the lock is not rewritten (no --update-merge-lock).
    second = _run(pytester, models, "--merge-summary", "summary.md")
    assert second.ret == 0
    second.stdout.fnmatch_lines(
        [
            "*digests match merge-harness.lock*",
            "*tiny_choice.acc*reused from lock (evaluation skipped)*",
            "benchmark: 2 result(s) reused from the lock file*",
        ]
    )
    report = _report(pytester)
    assert report["verdict"]["reused"] == [
        "merge::benchmark::perplexity",
        "merge::benchmark::tiny_choice.acc",
    ]
    assert "evaluation was skipped" in (pytester.path / "summary.md").read_text()
    assert lock_path.read_bytes() == locked_bytes

    # 3. A different merged checkpoint (one tensor nudged): the benchmarks run again, and without
    #    --update-merge-lock the lock check fails naming the digest and the tensor.
    changed = copy_checkpoint(tiny_llama.merged, pytester.path / "changed")
    target = "model.layers.1.mlp.down_proj.weight"

    def nudge(tensors):
        tensors[target] = tensors[target] + 1e-3

    rewrite(changed, nudge)
    models["merged"] = changed
    third = _run(pytester, models)
    assert third.ret == 1
    third.stdout.fnmatch_lines(
        [f"*merged digest changed since merge-harness.lock*1 merged tensor(s) differ: '{target}'*"]
    )
    checks = _by_id(_report(pytester))
    assert checks["merge::lock::digests"]["outcome"] == "failed"
    assert checks["merge::lock::digests"]["lock"]["changed"] == ["merged"]
    assert checks["merge::lock::digests"]["metrics"]["changed_tensors"] == [target]
    for name in ("merge::benchmark::perplexity", "merge::benchmark::tiny_choice.acc"):
        assert checks[name]["outcome"] == "passed" and not checks[name]["record"]["reused"]
    assert lock_path.read_bytes() == locked_bytes

    # 4. The same change approved with --update-merge-lock: the benchmarks re-ran and passed, so
    #    the lock is rewritten with the new merged digest.
    fourth = _run(pytester, models, "--update-merge-lock")
    assert fourth.ret == 0
    fourth.stdout.fnmatch_lines(["lock: updated *"])
    updated = json.loads(lock_path.read_text())
    assert updated["digests"]["merged"] != recorded["digests"]["merged"]
    assert updated["digests"]["base"] == recorded["digests"]["base"]
    assert updated["merged_tensors"][target] != recorded["merged_tensors"][target]


def test_missing_lock_without_update_says_so_and_writes_nothing(pytester, tiny_llama):
    pytester.makefile(".toml", **{"merge-harness": 'lock = "approved.lock"\n'})
    result = pytester.runpytest(
        "--merged-model",
        str(tiny_llama.merged),
        "--adapter",
        str(tiny_llama.adapter),
        "--base-model",
        str(tiny_llama.base),
        "--merge-checks",
        "lock",
    )
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "*no lock file approved.lock: nothing approved to compare with; run with"
            " --update-merge-lock*",
            "lock: no lock file at *approved.lock; run with --update-merge-lock to record one",
        ]
    )
    assert not (pytester.path / "approved.lock").exists()


def test_failed_gate_never_updates_the_lock(pytester, tiny_llama):
    # A merged model that is the base (adapter never applied): the hash check fails, so even
    # with --update-merge-lock nothing is recorded.
    result = pytester.runpytest(
        "--merged-model",
        str(tiny_llama.base),
        "--base-model",
        str(tiny_llama.base),
        "--adapter",
        str(tiny_llama.adapter),
        "--merge-checks",
        "hash,lock",
        "--update-merge-lock",
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(["lock: NOT updated (the gate failed): *merge-harness.lock"])
    assert not (pytester.path / "merge-harness.lock").exists()


def test_unreadable_lock_fails_with_one_line(pytester, tiny_llama):
    (pytester.path / "merge-harness.lock").write_text("{broken", encoding="utf-8")
    result = pytester.runpytest(
        "--merged-model",
        str(tiny_llama.merged),
        "--merge-checks",
        "lock",
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*merge::lock::digests*bad JSON lock file*"])
    assert "Traceback" not in result.stdout.str()


def test_lock_written_by_the_controller_under_xdist(pytester, tiny_llama):
    # The checks run on two workers; their results reach the controller through
    # report.user_properties, and only the controller writes the lock file.
    pytest.importorskip("xdist")
    result = pytester.runpytest_subprocess(
        "-n",
        "2",
        "-p",
        "xdist",
        "--merged-model",
        str(tiny_llama.merged),
        "--base-model",
        str(tiny_llama.base),
        "--adapter",
        str(tiny_llama.adapter),
        "--merge-checks",
        "hash,lock",
        "--update-merge-lock",
        "--merge-report",
        "report.json",
    )
    assert result.ret == 0, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines(["lock: recorded *merge-harness.lock*"])
    lock = json.loads((pytester.path / "merge-harness.lock").read_text())
    report = json.loads((pytester.path / "report.json").read_text())
    assert lock["digests"] == report["digests"]
    assert set(lock["digests"]) == {"merged", "base", "adapter"}
    assert len(lock["merged_tensors"]) == 21


def test_changed_adapter_is_named_and_blocks_reuse(tmp_path, tiny_llama):
    from harness.checks.lock import check_lock, current_digests, reusable
    from harness.run.context import Context
    from harness.run.settings import Settings

    options = Settings(
        merged=tiny_llama.merged,
        base=tiny_llama.base,
        adapter=tiny_llama.adapter,
        lock_path=tmp_path / "merge-harness.lock",
    )
    current = current_digests(Context(options))
    entry = {"fingerprint": "f" * 64, "evidence": {}, "outcome": "passed", "value": 1.0}
    digests = dict(current.digests, adapter="0" * 64)
    write_lock(
        options.lock_path,
        Lock(digests, current.merged_tensors, "0.1.0", {}, {"merge::benchmark::x.acc": entry}),
    )
    ctx = Context(options)
    result = check_lock(ctx)
    assert result.outcome.value == "failed"
    assert result.message.startswith(
        "adapter digest changed since merge-harness.lock (adapter 000000000000 ->"
    )
    assert result.lock is not None and result.lock.changed == ["adapter"]
    assert result.metrics["changed_tensors"] == []
    assert reusable(ctx, "merge::benchmark::x.acc", "f" * 64) is None
    # The same lock with the right adapter digest allows reuse, for the same fingerprint only.
    write_lock(
        options.lock_path,
        Lock(
            current.digests, current.merged_tensors, "0.1.0", {}, {"merge::benchmark::x.acc": entry}
        ),
    )
    fresh = Context(options)
    assert check_lock(fresh).outcome.value == "passed"
    assert reusable(fresh, "merge::benchmark::x.acc", "f" * 64) == entry
    assert reusable(fresh, "merge::benchmark::x.acc", "e" * 64) is None
