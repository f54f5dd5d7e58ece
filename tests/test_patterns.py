"""Catastrophic and malformed regexes in adapter configs: refused in bounded time, peft's answers.

The hostile adapters are real adapter folders whose ``adapter_config.json`` carries the
pattern; the runs are the real plugin and the real ``merge-harness merge``. A pattern is
catastrophic for ``re`` on the names a model actually has: ``(.|.|.)*Z`` backtracks 3**n ways
on an n-character module name that holds no ``Z``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.errors import AdapterError
from harness.io.patterns import PATTERN_SECONDS, PatternMatcher, module_names, pattern_key, screen

CATASTROPHIC = ["(.|.|.)*Z", "(a+)+$", "(\\w|\\w\\w|\\w\\w\\w)+Z"]
NAME = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_pattern_is_refused_within_the_budget(pattern):
    matcher = PatternMatcher("adapter_config.json")
    names = [NAME, "a" * 40 + "!"]
    started = time.perf_counter()
    with pytest.raises(AdapterError, match=r"takes more than 2 s to match the module names"):
        screen({"target_modules": pattern}, names, matcher)
    elapsed = time.perf_counter() - started
    assert elapsed < PATTERN_SECONDS + 2, elapsed


def test_the_budget_is_shared_by_all_matches_of_an_adapter():
    """A pattern just fast enough per name cannot add up to a hang over many names."""
    matcher = PatternMatcher("adapter_config.json", seconds=0.5)
    names = [f"model.layers.{i}.{'a' * 22}!" for i in range(200)]  # about 20 ms each
    started = time.perf_counter()
    with pytest.raises(AdapterError, match=r"takes more than 0\.5 s"):
        screen({"rank_pattern": {"(a+)+$": 4}}, names, matcher)
    assert time.perf_counter() - started < 3


def test_off_the_main_thread_the_regex_timeout_bounds_it():
    """No signal reaches another thread: the ``regex`` package's own timeout does it there."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            PatternMatcher("adapter_config.json", seconds=0.5).match(
                "(a|aa)+$", "a" * 40 + "!", "target_modules", full=True
            )
        except AdapterError as exc:
            errors.append(exc)

    thread = threading.Thread(target=work)
    started = time.perf_counter()
    thread.start()
    thread.join(30)
    assert time.perf_counter() - started < 10
    assert errors and "takes more than 0.5 s" in str(errors[0])


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(" * 5000 + ")" * 5000, "nests groups 5000 levels deep (at most 100)"),
        ("(?:" * 101 + "a" + ")" * 101, "nests groups 101 levels deep (at most 100)"),
        ("a{4294967296}", "has a repeat count of 2**32 - 1 or more"),
        ("a{99999999999999999999}", "has a repeat count of 2**32 - 1 or more"),
        ("(unclosed", "is not a regex: missing ), unterminated subpattern"),
    ],
    ids=["deep", "deep-101", "repeat-2**32", "repeat-huge", "syntax"],
)
def test_malformed_patterns_get_a_clear_cause(pattern, message):
    with pytest.raises(AdapterError, match=re.escape(message)) as caught:
        PatternMatcher("adapter_config.json").compile(pattern, "rank_pattern key")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


# ---- peft's answers ------------------------------------------------------------------------------

segments = st.sampled_from(["model", "layers", "0", "1", "12", "self_attn", "q_proj", "mlp",
                            "up_proj", "lm_head", "a"])
names = st.lists(segments, min_size=1, max_size=6).map(".".join)
atoms = st.one_of(segments, st.sampled_from([r"\d+", ".*", "q_proj|v_proj", "[a-z_]+", "proj"]))
keys = st.lists(atoms, min_size=1, max_size=3).map(lambda parts: r"\.".join(parts))


@settings(max_examples=300, deadline=None)
@given(patterns=st.lists(keys, min_size=1, max_size=4, unique=True), module=names)
def test_pattern_key_answers_as_peft(patterns, module):
    """The bounded matcher picks the key peft's get_pattern_key picks (same engine, same rule)."""
    from peft.utils.other import get_pattern_key

    table = {key: 1 for key in patterns}
    found = pattern_key(table, module)
    # peft returns the module name itself when no key matches
    assert (module if found is None else found) == get_pattern_key(list(table), module)


@settings(max_examples=200, deadline=None)
@given(pattern=keys, module=names)
def test_thread_fallback_answers_as_re(pattern, module):
    """Off the main thread (``regex`` with a timeout) the answers are ``re``'s."""
    expected = re.match(rf"(.*\.)?({pattern})$", module) is not None
    out: list[bool] = []
    thread = threading.Thread(target=lambda: out.append(
        PatternMatcher("x").match(pattern, module, "k", template=r"(.*\.)?({})$")))
    thread.start()
    thread.join()
    assert out == [expected]


def test_a_pattern_at_the_depth_limit_compiles():
    pattern = "(" * 100 + "q_proj" + ")" * 100
    assert PatternMatcher("x").compile(pattern, "k").fullmatch("q_proj")


def test_module_names_are_every_prefix():
    assert module_names(["model.layers.0.q.weight", "lm_head.weight"]) == [
        "lm_head", "model", "model.layers", "model.layers.0", "model.layers.0.q",
    ]


# ---- end to end: the plugin and the merger ------------------------------------------------------


def hostile_adapter(source: Path, target: Path, **changes: object) -> Path:
    shutil.copytree(source, target)
    path = target / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("changes", "what"),
    [
        ({"target_modules": "(.|.|.)*Z"}, "target_modules '(.|.|.)*Z'"),
        ({"rank_pattern": {"(.|.|.)*Z": 4}}, "rank_pattern key '(.|.|.)*Z'"),
        ({"alpha_pattern": {"q_proj": 8, "(.|.|.)*Z": 4}}, "alpha_pattern key '(.|.|.)*Z'"),
    ],
    ids=["target_modules", "rank_pattern", "alpha_pattern"],
)
def test_plugin_refuses_a_catastrophic_pattern_in_bounded_time(pytester, tiny_llama, changes,
                                                               what):
    adapter = hostile_adapter(tiny_llama.adapter, pytester.path / "adapter", **changes)
    started = time.perf_counter()
    result = pytester.runpytest(
        "-p", "no:randomly", "--merge-checks", "weights,behaviour", "--merge-examples", "2",
        "--merged-model", str(tiny_llama.merged), "--base-model", str(tiny_llama.base),
        "--adapter", str(adapter),
    )
    elapsed = time.perf_counter() - started
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == 1 and "Traceback" not in output
    assert elapsed < 60, elapsed
    result.stdout.fnmatch_lines([
        f"FAIL merge::weights::* adapter_config.json: {what} takes more than 2 s to match the"
        " module names (catastrophic backtracking); refusing it*",
    ])
    # the behaviour checks never hand the adapter to peft, which would hang
    result.stdout.fnmatch_lines([f"FAIL merge::behaviour::* *{what} takes more than 2 s*"])


def test_merge_command_refuses_a_catastrophic_pattern(tmp_path, tiny_llama):
    adapter = hostile_adapter(tiny_llama.adapter, tmp_path / "adapter",
                              rank_pattern={"(.|.|.)*Z": 4})
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "merge", str(tiny_llama.base), str(adapter),
         str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert time.perf_counter() - started < 60
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "merge-harness merge: adapter_config.json: rank_pattern key '(.|.|.)*Z' takes more than"
        " 2 s to match the module names (catastrophic backtracking); refusing it (peft would"
        " hang on it)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
