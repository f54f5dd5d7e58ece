"""Every bad input is a failed check (exit 1) or a usage error (exit 4) with a one-line cause.

Each row of ``support.badinput.CASES`` damages a private copy of a tiny real merge, runs the
plugin from an empty folder exactly as a user would, and asserts the exit status, the one-line
message naming the file, and that no traceback or INTERNALERROR was printed. The same rows make
the documentation's table (``support.badinput.render_case_table()``).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from support.badinput import CASES, Case
from support.damage import Foreign, Good, join
from support.guard import install_family

from harness.errors import CheckpointError
from harness.io.checkpoint import Checkpoint
from harness.io.safetensors import read_header
from harness.tiny import AdapterSpec, ModelSpec

# ---- the inputs every case starts from ---------------------------------------------------------


@pytest.fixture(scope="module")
def foreign(tiny_merge_factory) -> Foreign:
    """A wider Llama with its adapter, and a GPT-2 adapter (tiny_merge_factory's)."""
    wide = ModelSpec(overrides=(("hidden_size", 64), ("intermediate_size", 128)), tokenizer=False)
    gpt2 = ModelSpec("gpt2", tokenizer=False)
    return Foreign(tiny_merge_factory.base(wide), tiny_merge_factory.adapter(wide, AdapterSpec()),
                   tiny_merge_factory.adapter(gpt2, AdapterSpec((("fan_in_fan_out", True),))))


@pytest.fixture
def good(pytester: pytest.Pytester, tiny_llama, tiny_llama_sharded, foreign) -> Good:
    """Copies made inside the pytester folder (the run's working directory)."""
    root = pytester.path / "inputs"
    copies = {}
    for name, source in (("base", tiny_llama.base), ("adapter", tiny_llama.adapter),
                         ("merged", tiny_llama.merged), ("sharded", tiny_llama_sharded.merged),
                         ("sharded_base", tiny_llama_sharded.base)):
        copies[name] = Path(shutil.copytree(source, root / name))
    return Good(root=root, foreign=foreign, **copies)


def assert_clean(output: str) -> None:
    """No traceback, no INTERNALERROR: whatever went wrong was reported as one line."""
    assert "Traceback" not in output, output
    assert "INTERNALERROR" not in output, output


def run_case(pytester: pytest.Pytester, good: Good, case: Case, subprocess: bool = False) -> None:
    """Run ``case``: its exit status and one-line message, and no traceback."""
    args = ["-p", "no:randomly", "--merge-checks", case.families, *case.make(good)]
    result = pytester.runpytest_subprocess(*args) if subprocess else pytester.runpytest(*args)
    output = result.stdout.str() + "\n" + result.stderr.str()
    assert_clean(output)
    assert result.ret == case.status, output
    # Messages are fnmatch patterns: "*" is the only wildcard, brackets and "?" are literal.
    message = case.message.replace("{root}", str(good.root))
    pattern = re.sub(r"[\[\]?]", lambda m: f"[{m.group()}]", message)
    if case.check is None:
        result.stderr.fnmatch_lines([f"ERROR: {pattern}"])
    else:
        result.stdout.fnmatch_lines([f"FAIL merge::{case.check} *{pattern}"])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(pytester: pytest.Pytester, good: Good, case: Case):
    run_case(pytester, good, case)


@pytest.mark.parametrize("case_id", ["merged-missing", "header-absurd"])
def test_bad_input_subprocess(pytester: pytest.Pytester, good: Good, case_id: str):
    """The same, through a real subprocess: what CI sees, stderr included."""
    run_case(pytester, good, next(c for c in CASES if c.id == case_id), subprocess=True)


# ---- resource bounds ----------------------------------------------------------------------------


def test_absurd_header_allocates_nothing(tmp_path: Path):
    """A header declaring 2**60 bytes (or just beyond the file) is refused before any read."""
    path = tmp_path / "model.safetensors"
    for declared in (2**60, 2**64 - 1, 99_999_999):
        path.write_bytes(struct.pack("<Q", declared) + b"{}" + b"\0" * 64)
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError, match=r"exceeds|truncated"):
                read_header(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 256 * 1024, f"declared {declared}: peak {peak} bytes"


def test_huge_tensor_claims_allocate_nothing(tmp_path: Path):
    """Shapes and offsets claiming terabytes are refused from the header, before a read."""
    header = {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(join(header, b"\0" * 16))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="truncated: tensor 'w' ends at data byte"):
            Checkpoint.open(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_reading_holds_one_tensor(tmp_path: Path):
    """Streaming a checkpoint allocates about one tensor at a time, not the whole model."""
    from harness.stream.scan import scan_checkpoint

    tensors = {f"layer{i}.weight": torch.randn(256, 256) for i in range(16)}  # 16 x 256 KiB
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    checkpoint = Checkpoint.open(folder)
    tracemalloc.start()
    try:
        scan_checkpoint(checkpoint)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one = 256 * 256 * 4
    # The reader thread stays at most two tensors ahead of the consumer (plus the one in use).
    assert peak < 5 * one, f"peak {peak} bytes for tensors of {one} bytes (model {16 * one})"


# ---- hangs, internal errors and interrupts through the real runner -----------------------------


def _check(run: Callable[[Any], Any]) -> Any:
    from harness.run.check import Check
    from harness.run.result import Family

    return Check(Family.STRUCTURE, "probe", "test-only", run)


def _context() -> Any:
    from harness.run.context import Context
    from harness.run.settings import Settings

    return Context(Settings())


def test_timeout_turns_a_hang_into_a_failed_check():
    import threading
    import time

    from harness.run.result import Outcome
    from harness.run.runner import run_check

    release = threading.Event()
    started = time.perf_counter()
    result = run_check(_check(lambda ctx: release.wait(30)), _context(), timeout=0.2)
    elapsed = time.perf_counter() - started
    release.set()  # let the abandoned thread finish
    assert result.outcome is Outcome.FAILED
    assert result.message == "timed out after 0.2 s (raise --merge-timeout if the inputs are large)"
    assert elapsed < 5


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_keyboard_interrupt_still_interrupts(timeout):
    from harness.run.runner import run_check

    def interrupt(ctx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_check(_check(interrupt), _context(), timeout=timeout)


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ValueError("boom\nsecond line"),
         "internal error in merge::structure::probe: ValueError: boom (checking no input)"),
        (SystemExit(3), "internal error in merge::structure::probe: SystemExit(3)"),
        (MemoryError(), "ran out of resources: MemoryError while checking no input"),
        (CheckpointError("x.safetensors: bad\nmore"), "x.safetensors: bad"),
    ],
)
def test_errors_become_one_line_failures(error, message, timeout):
    from harness.run.result import Outcome
    from harness.run.runner import run_check

    def fail(ctx):
        raise error

    result = run_check(_check(fail), _context(), timeout=timeout)
    assert result.outcome is Outcome.FAILED
    assert result.message == message


def test_internal_error_item_shows_one_line(pytester: pytest.Pytester, monkeypatch, tiny_llama):
    """An unexpected exception in a check: one line; the traceback only with --full-trace."""
    def broken(ctx):
        return {}["no such key"]

    install_family(monkeypatch, {"lookup": broken})
    args = ["--merge-checks", "security", "--merged-model", str(tiny_llama.merged)]
    result = pytester.runpytest(*args)
    assert result.ret == 1
    assert_clean(result.stdout.str() + result.stderr.str())
    result.stdout.fnmatch_lines(
        ["FAIL merge::security::lookup *internal error in merge::security::lookup: KeyError: 'no*"]
    )
    traced = pytester.runpytest(*args, "--full-trace")
    assert traced.ret == 1
    traced.stdout.fnmatch_lines(["Traceback (most recent call last):", "*KeyError*"])


def test_timeout_option_end_to_end(pytester: pytest.Pytester, monkeypatch, tiny_llama):
    """--merge-timeout fails a hanging check and the run goes on to the next one."""
    import threading

    release = threading.Event()
    install_family(monkeypatch, {"hang": lambda ctx: release.wait(30),
                                 "quick": lambda ctx: _passed("fine")})
    try:
        result = pytester.runpytest("--merge-checks", "security", "--merge-timeout", "0.5",
                                    "--merged-model", str(tiny_llama.merged))
    finally:
        release.set()
    assert result.ret == 1
    assert_clean(result.stdout.str() + result.stderr.str())
    result.stdout.fnmatch_lines(["FAIL merge::security::hang *timed out after 0.5 s*",
                                 "PASS merge::security::quick *fine"])


def _passed(message: str) -> Any:
    from harness.run.result import CheckResult

    return CheckResult.passed(message)



def test_hf_cache_snapshot_symlinks_are_followed(tmp_path: Path, tiny_llama):
    """A Hugging Face cache snapshot (files are symlinks into ../../blobs) opens; a symlink
    from the same snapshot to anywhere else is still refused."""
    repo = tmp_path / "models--tiny--llama"
    snapshot_dir = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        blob = repo / "blobs" / f"blob-{name}"
        shutil.copy(tiny_llama.merged / name, blob)
        (snapshot_dir / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    checkpoint = Checkpoint.open(snapshot_dir)
    assert len(checkpoint.tensors) == 21 and checkpoint.config is not None
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    (snapshot_dir / "config.json").unlink()
    (snapshot_dir / "config.json").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="symlink resolves outside its folder"):
        Checkpoint.open(snapshot_dir)


def test_folder_hash_refuses_what_it_must_not_read(tmp_path: Path):
    """hash_folder (adapters, task folders) never follows a link out or blocks on a pipe."""
    from harness.stream.hashing import hash_folder

    folder = tmp_path / "tasks"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.yaml").write_text("task: a\n")
    first = hash_folder(folder)
    (folder / "sub" / "a.yaml").write_text("task: b\n")
    assert hash_folder(folder) != first
    secret = tmp_path / "secret"
    secret.write_text("token")
    (folder / "leak.yaml").symlink_to(secret)
    with pytest.raises(CheckpointError, match="symlink resolves outside"):
        hash_folder(folder)
    (folder / "leak.yaml").unlink()
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    with pytest.raises(CheckpointError, match="symlinked folder"):
        hash_folder(folder)
    (folder / "loop").unlink()
    os.mkfifo(folder / "pipe.yaml")
    with pytest.raises(CheckpointError, match="not a regular file"):
        hash_folder(folder)


def test_warning_as_error_is_one_line(pytester: pytest.Pytester, monkeypatch, tiny_llama):
    """Under -W error a check's warning fails its item, still with one line and no traceback."""
    from harness.run.result import CheckResult, Outcome

    install_family(monkeypatch, {
        "sidecar": lambda ctx: CheckResult(Outcome.WARNING, "tokenizer.json differs from the base"),
    })
    # (a plain "-W error" in-process would also raise pytest's own already-imported warning)
    result = pytester.runpytest("-W", "error::harness.plugin.items.MergeHarnessWarning",
                                "--merge-checks", "security",
                                "--merged-model", str(tiny_llama.merged))
    assert_clean(result.stdout.str() + result.stderr.str())
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "merge::security::sidecar: tokenizer.json differs from the base (a warning, raised as an"
        " error by -W)"
    ])
