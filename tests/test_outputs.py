"""The harness's own outputs: planted symlinks, concurrent updaters, full disks.

Each situation is made for real: symlinks planted where a pull request can plant them (the
default lock path, its old fixed temporary name, a report path), two processes updating one lock
while a third reads it, a full tmpfs (when the tests run as root) and a file-size limit
(``RLIMIT_FSIZE``, which makes ``write`` fail with ``EFBIG``) in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import OutputError
from harness.gate.lockfile import Lock, dumps, read_lock, write_lock
from harness.io.output import write_atomic, write_text_atomic

VICTIM_TEXT = "the runner's precious file\n"


def leftovers(folder: Path) -> list[str]:
    """Temporary files an interrupted or failed write left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_text(VICTIM_TEXT)
    return path


# ---- the writer itself --------------------------------------------------------------------


def test_atomic_write_replaces_keeps_mode_and_leaves_nothing(tmp_path: Path):
    target = tmp_path / "report.json"
    write_text_atomic(target, "one\n")
    assert target.read_text() == "one\n"
    target.chmod(0o640)
    write_text_atomic(target, "two\n")
    assert target.read_text() == "two\n"
    assert target.stat().st_mode & 0o777 == 0o640
    assert leftovers(tmp_path) == []


def test_planted_symlink_is_refused_not_followed(tmp_path: Path, victim: Path):
    target = tmp_path / "merge-harness.lock"
    target.symlink_to(victim)
    with pytest.raises(OutputError, match=r"is a symlink .*refusing to write through it"):
        write_text_atomic(target, "{}\n")
    assert victim.read_text() == VICTIM_TEXT and target.is_symlink()
    assert leftovers(tmp_path) == []


def test_planted_temporary_name_is_never_used(tmp_path: Path, victim: Path):
    """The old fixed temporary name, planted as a symlink: ignored, the victim untouched."""
    (tmp_path / "merge-harness.lock.tmp").symlink_to(victim)
    write_lock(tmp_path / "merge-harness.lock", Lock({"merged": "ab"}))
    assert victim.read_text() == VICTIM_TEXT
    assert read_lock(tmp_path / "merge-harness.lock") == Lock({"merged": "ab"})


def test_a_named_symlink_is_followed_and_kept(tmp_path: Path, victim: Path):
    """A lock the user named with --merge-lock may be a symlink: its target is replaced."""
    link = tmp_path / "merge-harness.lock"
    link.symlink_to(victim)
    write_lock(link, Lock({"merged": "cd"}), named=True)
    assert link.is_symlink() and json.loads(victim.read_text())["digests"] == {"merged": "cd"}
    assert read_lock(link, named=True) == Lock({"merged": "cd"})
    assert leftovers(victim.parent) == []


def test_reading_a_planted_lock_symlink_is_refused(tmp_path: Path):
    secret = tmp_path / "environ.json"
    secret.write_text(json.dumps({"format": "merge-harness.lock/1", "GITHUB_TOKEN": "ghs_x"}))
    link = tmp_path / "merge-harness.lock"
    link.symlink_to(secret)
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="lock file is a symlink; refusing to follow it") as exc:
        read_lock(link)
    assert "ghs_x" not in str(exc.value) and "GITHUB_TOKEN" not in str(exc.value)


# ---- through the plugin -----------------------------------------------------------------------


def _run(pytester: pytest.Pytester, tiny_llama, *extra: str) -> pytest.RunResult:
    return pytester.runpytest(
        "-p", "no:randomly", "--merge-checks", "structure,hash,lock", "--merged-model",
        str(tiny_llama.merged), "--base-model", str(tiny_llama.base), *extra,
    )


def test_plugin_refuses_a_planted_lock_symlink(pytester, tiny_llama, victim):
    (pytester.path / "merge-harness.lock").symlink_to(victim)
    result = _run(pytester, tiny_llama, "--update-merge-lock")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == 1 and "Traceback" not in output
    result.stdout.fnmatch_lines(["FAIL merge::lock::digests *lock file is a symlink; refusing*"])
    assert victim.read_text() == VICTIM_TEXT


def test_plugin_refuses_a_planted_report_symlink(pytester, tiny_llama, victim):
    report = pytester.path / "reports" / "merge-report.json"
    report.parent.mkdir()
    report.symlink_to(victim)
    result = _run(pytester, tiny_llama, "--merge-report", str(report))
    assert result.ret == 1
    result.stdout.fnmatch_lines(["--merge-report: *merge-report.json: is a symlink*refusing*"])
    assert victim.read_text() == VICTIM_TEXT


# ---- concurrent updaters -----------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from harness.gate.lockfile import Lock, write_lock
    path, tag = Path(sys.argv[1]), sys.argv[2]
    lock = Lock({"merged": tag * 64}, {f"t{i}": tag * 64 for i in range(400)})
    for _ in range(150):
        write_lock(path, lock)
""")


def test_concurrent_updaters_never_tear_a_read(tmp_path: Path):
    """Two processes rewrite one lock while this one reads it: every read is a whole lock."""
    path = tmp_path / "merge-harness.lock"
    write_lock(path, Lock({"merged": "0" * 64}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag], env=env,
                                stderr=subprocess.PIPE, text=True) for tag in "ab"]
    seen: set[str] = set()
    while any(w.poll() is None for w in writers):
        lock = read_lock(path)  # a torn file would be a ConfigError here
        assert lock is not None
        seen.add(lock.digests["merged"][0])
    for writer in writers:
        assert writer.wait() == 0, writer.stderr.read() if writer.stderr else ""
    assert seen <= {"0", "a", "b"} and seen & {"a", "b"}
    assert leftovers(tmp_path) == []


# ---- full disks --------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "256k") -> Iterator[Path]:
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip("needs root to mount a tmpfs (the RLIMIT_FSIZE tests cover the rest)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int) -> None:
    """Fill a file system but for about ``leave`` bytes."""
    free = os.statvfs(folder)
    room = free.f_bavail * free.f_frsize - leave
    with contextlib.suppress(OSError), (folder / "filler").open("wb") as handle:
        handle.write(b"\0" * max(room, 0))


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    with small_tmpfs(tmp_path / "disk") as disk:
        yield disk


def test_full_disk_keeps_the_old_file_and_removes_the_temporary(full_disk: Path):
    target = full_disk / "merge-harness.lock"
    write_lock(target, Lock({"merged": "old"}))
    fill(full_disk, 2048)
    big = Lock({"merged": "new"}, {f"tensor.{i}": "f" * 64 for i in range(1000)})
    with pytest.raises(OutputError, match="cannot write: No space left on device"):
        write_lock(target, big)
    assert read_lock(target) == Lock({"merged": "old"})
    assert leftovers(full_disk) == []


def test_plugin_on_a_full_disk_fails_with_the_cause(pytester, tiny_llama, full_disk):
    fill(full_disk, 4096)
    report = full_disk / "merge-report.json"
    result = _run(pytester, tiny_llama, "--merge-report", str(report), "--update-merge-lock",
                  "--merge-lock", str(full_disk / "merge-harness.lock"))
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == 1 and "Traceback" not in output
    result.stdout.fnmatch_lines(["*--merge-report: *merge-report.json: cannot write: No space left"
                                 " on device"])
    assert not report.exists()
    assert leftovers(full_disk) == []


FSIZE = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from harness.errors import HarnessError
    from harness.gate.lockfile import Lock, write_lock
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        lock = Lock({"merged": "x"}, {f"t{i}": "f" * 64 for i in range(500)})
        write_lock(Path(sys.argv[1]), lock)
    except HarnessError as exc:
        print(exc)
        sys.exit(1)
""")


def test_file_size_limit_fails_cleanly(tmp_path: Path):
    """RLIMIT_FSIZE: the kernel refuses the write (EFBIG); no temporary file stays behind."""
    target = tmp_path / "merge-harness.lock"
    target.write_text(dumps(Lock({"merged": "old"})))
    done = subprocess.run([sys.executable, "-c", FSIZE, str(target)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          check=False)
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip() == f"{target}: cannot write: File too large"
    assert read_lock(target) == Lock({"merged": "old"})
    assert leftovers(tmp_path) == []


def test_write_atomic_refuses_a_folder(tmp_path: Path):
    (tmp_path / "x").mkdir()
    with pytest.raises(OutputError, match="is a folder; refusing to replace it"):
        write_atomic(tmp_path / "x", b"")


def test_gate_with_a_lock_planted_as_a_symlink_to_dev_zero(tmp_path, tiny_llama):
    """The gate hashes the lock before and after the run: a link to /dev/zero is never read."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "merge-harness.lock").symlink_to("/dev/zero")
    done = subprocess.run(
        [sys.executable, "-m", "harness.action", "--merged-model", str(tiny_llama.merged),
         "--base-model", str(tiny_llama.base), "--report-dir", str(workspace / "reports"),
         "--", "-p", "no:randomly", "--merge-checks", "structure,lock"],
        cwd=workspace, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "lock file is a symlink; refusing to follow it" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
