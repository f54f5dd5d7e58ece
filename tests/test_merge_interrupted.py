"""``merge-harness merge`` under SIGINT, SIGTERM and SIGKILL, two runs on one output, full disks.

Every situation is real: the merge runs as the console command in a subprocess and is signalled
while it writes (the base is big enough, 128 MiB, for a merge to take a while), a second merge
starts while the first holds the output, the disk is a full tmpfs (when the tests run as root)
or the process has a file-size limit (``RLIMIT_FSIZE``: ``write`` fails with ``EFBIG``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.signals import sigint_as_from_a_terminal

from harness.io.staging import MARKER, PARTIAL, lock_path

#: Layers of the synthetic base: 8 x (2048 x 2048) fp32 = 128 MiB.
LAYERS, WIDTH, RANK = 8, 2048, 8


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A base of eight 16 MiB projections and a LoRA adapter on all of them."""
    root = tmp_path_factory.mktemp("big-merge")
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    generator = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(LAYERS)]
    save_file({f"{n}.weight": torch.randn(WIDTH, WIDTH, generator=generator) for n in names},
              base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tensors = {}
    for name in names:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, WIDTH,
                                                                        generator=generator)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(WIDTH, RANK,
                                                                        generator=generator)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    return base, adapter


def merge_command(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "merge", str(base), str(adapter), str(out),
            "--no-progress", *extra]


def env() -> dict[str, str]:
    # one worker: the merge lasts long enough on any machine to be caught mid-write
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MERGE_HARNESS_WORKERS": "1"}


def start(base: Path, adapter: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(merge_command(base, adapter, out), env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=sigint_as_from_a_terminal)


def wait_for_shard(parent: Path, out: Path, process: subprocess.Popen[str]) -> Path:
    """The staging folder, once its shard is being written."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for folder in parent.glob(f".{out.name}.*.merging"):
            shard = folder / ("model.safetensors" + PARTIAL)
            if shard.exists() and shard.stat().st_size > 0:
                return folder
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    raise AssertionError("the merge never started writing")


def beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


@pytest.mark.parametrize(("sig", "status", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                     (signal.SIGTERM, 143, "terminated")])
def test_signal_removes_the_staging_folder(tmp_path, big, sig, status, word):
    base, adapter = big
    out = tmp_path / "out"
    process = start(base, adapter, out)
    wait_for_shard(tmp_path, out, process)
    process.send_signal(signal.SIGSTOP)  # hold it mid-write, however fast the machine
    process.send_signal(sig)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"merge-harness merge: {word}")
    assert beside(out) == []  # no staging folder, no lock file, no output


def test_sigkill_debris_is_marked_harmless_and_removed_next_time(tmp_path, big):
    base, adapter = big
    out = tmp_path / "out"
    process = start(base, adapter, out)
    staging = wait_for_shard(tmp_path, out, process)
    process.send_signal(signal.SIGSTOP)
    process.kill()
    process.wait(timeout=30)
    # the debris: a hidden, marked folder whose files cannot be taken for a checkpoint
    names = sorted(p.name for p in staging.iterdir())
    assert MARKER in names
    assert all(n == MARKER or n.endswith(PARTIAL) for n in names), names
    assert "interrupted" in (staging / MARKER).read_text()
    from harness.errors import CheckpointError
    from harness.io.checkpoint import Checkpoint

    with pytest.raises(CheckpointError):
        Checkpoint.open(staging)
    # the next merge into the same output removes it, and says so
    done = subprocess.run(merge_command(base, adapter, out), env=env(), capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert f"removed {staging}, left by an interrupted merge" in done.stderr
    assert beside(out) == ["out"]
    assert not (out / MARKER).exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_a_second_merge_into_the_same_output_refuses(tmp_path, big):
    base, adapter = big
    out = tmp_path / "out"
    first = start(base, adapter, out)
    wait_for_shard(tmp_path, out, first)
    first.send_signal(signal.SIGSTOP)  # still holding the output's lock, however fast it is
    try:
        second = subprocess.run(merge_command(base, adapter, out), env=env(),
                                capture_output=True, text=True, timeout=120, check=False)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 4
    assert second.stderr.strip() == (
        f"merge-harness merge: {out}: another merge into it is running (process {first.pid}"
        f" holds {lock_path(out)}); refusing to write it twice"
    )
    assert first.wait(timeout=300) == 0
    assert beside(out) == ["out"]


def test_an_output_that_appears_during_the_merge_is_not_replaced(tmp_path, big):
    base, adapter = big
    out = tmp_path / "out"
    process = start(base, adapter, out)
    wait_for_shard(tmp_path, out, process)
    process.send_signal(signal.SIGSTOP)  # mid-write, whatever the speed of the machine
    out.mkdir()
    (out / "theirs.txt").write_text("written by someone else")
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 4
    assert err.strip().splitlines()[-1] == (
        f"merge-harness merge: {out}: appeared while the merge was being written; refusing to"
        " replace it (the merge is discarded)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert beside(out) == ["out"]


# ---- full disks ----------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True, check=False,
    ).returncode:
        pytest.skip("needs root to mount a tmpfs (the RLIMIT_FSIZE test covers the rest)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_merge_onto_a_full_disk_fails_with_the_cause(tmp_path, tiny_llama):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        out = disk / "out"
        done = subprocess.run(merge_command(tiny_llama.base, tiny_llama.adapter, out), env=env(),
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 4, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip() == (
            f"merge-harness merge: {out}: cannot write the merge: No space left on device"
        )
        assert beside(out) == []


FSIZE = textwrap.dedent("""
    import resource, signal, sys
    from harness.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (32768, 32768))
    sys.exit(main(sys.argv[1:]))
""")


def test_merge_past_a_file_size_limit_fails_with_the_cause(tmp_path, tiny_llama):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", FSIZE, "merge", str(tiny_llama.base), str(tiny_llama.adapter),
         str(out), "--no-progress"],
        env=env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 4, done.stderr
    assert done.stderr.strip() == (
        f"merge-harness merge: {out}: cannot write the merge: File too large"
    )
    assert beside(out) == []


# ---- bad input: one line, the documented code ---------------------------------------------------


def test_merge_errors_are_one_line_never_a_traceback(tmp_path, tiny_llama):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "x": ' +
                                                 "[" * 5000 + "]" * 5000 + "}")
    done = subprocess.run(merge_command(tiny_llama.base, adapter, tmp_path / "out"), env=env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 4
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("merge-harness merge: adapter_config.json: malformed JSON")


def test_a_non_utf8_output_name_is_printed_escaped(tmp_path, tiny_llama):
    out = Path(os.fsdecode(bytes(tmp_path) + b"/out\xff"))
    done = subprocess.run(merge_command(tiny_llama.base, tiny_llama.adapter, out), env=env(),
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == str(tmp_path) + "/out\\udcff"
    assert out.is_dir()
