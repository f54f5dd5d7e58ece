"""Where a merge is written before it exists: an exclusive lock, a marked staging folder, publish.

A merge writes gigabytes for minutes, so it is written into a staging folder beside the output
and renamed into place at the end. What can go wrong around that, and what this module does:

- **Two merges into one output.** :func:`exclusive` takes an ``fcntl.flock`` lock on
  ``.<out>.lock`` beside the output for the whole merge; a second merge into the same output
  refuses at once, naming the process that holds it. The lock file is removed afterwards.
- **An output that appears meanwhile.** :func:`publish` refuses to replace an output that was
  created during the merge unless ``overwrite`` was asked for.
- **SIGKILL.** Nothing can clean up after it, so the debris is made unmistakable and harmless:
  the staging folder ``.<out>.<random>.merging`` holds a :data:`MARKER` file saying what it is,
  and every file in it is named ``*.partial`` until :func:`publish` renames them, so nothing
  in it loads as a checkpoint. The next merge into the same output removes stale staging
  folders (only marked ones, and only while it holds the lock) and says so.
- **A full disk.** Every file is synced before the rename, so a write error surfaces as an
  ``OSError`` during the merge, never as a silently short file after it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from harness.errors import MergeError

#: The file that marks a folder as an unfinished merge (and says so to whoever finds it).
MARKER = "MERGE-IN-PROGRESS.txt"
#: Files in a staging folder carry this suffix until the merge is published.
PARTIAL = ".partial"


def lock_path(out: Path) -> Path:
    """The lock file of merges into ``out``: hidden, beside it."""
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[Path]:
    """Hold the exclusive lock of merges into ``out``; MergeError when another merge has it.

    The lock file is unlinked on release; a process that opened it just before (and so locked a
    file no longer in place) sees that the path now names another file, and tries again.
    """
    path = lock_path(out)
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise MergeError(
                f"{out}: another merge into it is running ({holder} holds {path}); refusing to"
                " write it twice"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # it was unlinked by the previous holder: lock the new file
    else:  # pragma: no cover - ten lost races in a row
        raise MergeError(f"{out}: cannot take the lock {path}")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def remove_stale(out: Path) -> list[Path]:
    """Remove the marked debris of earlier merges into ``out`` (call with the lock held)."""
    removed = []
    for pattern in (f".{out.name}.*.merging", f".{out.name}.*.old"):
        for folder in sorted(out.parent.glob(pattern)):
            if folder.is_dir() and not folder.is_symlink() and (folder / MARKER).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def _mark(folder: Path, out: Path, what: str) -> None:
    (folder / MARKER).write_text(
        f"This folder is {what} by merge-harness (process {os.getpid()}, started"
        f" {time.strftime('%Y-%m-%d %H:%M:%S')}), on its way to {out}.\n"
        "If that process is gone, the merge was interrupted: this is not a checkpoint (its files"
        f" end in {PARTIAL}). Delete the folder, or run the merge again, which removes it.\n",
        encoding="utf-8",
        errors="backslashreplace",  # an output name that is not UTF-8
    )


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A new, marked staging folder beside ``out``; removed unless published."""
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".merging", dir=out.parent))
    # mkdtemp makes a private 0700 folder; the published merge gets what save_pretrained's
    # os.makedirs would give it: the user's umask.
    folder.chmod(0o777 & ~current_umask())
    try:
        _mark(folder, out, "a merge being written")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # a no-op once published (renamed away)


def partial(folder: Path, name: str) -> Path:
    """Where the file ``name`` is written inside a staging folder until publication."""
    return folder / (name + PARTIAL)


def write_file(path: Path, data: bytes) -> None:
    """Write and sync one file of a staging folder."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _sync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def publish(folder: Path, out: Path, *, overwrite: bool, existed: bool) -> None:
    """Give the staged files their names and move the folder into place as ``out``.

    ``existed``: whether ``out`` was there when the merge started (and ``overwrite`` allowed
    replacing it). An output that appeared during the merge is refused, never replaced.
    """
    if (out.exists() or out.is_symlink()) and not (overwrite and existed):
        raise MergeError(
            f"{out}: appeared while the merge was being written; refusing to replace it (the"
            " merge is discarded)"
        )
    for staged in sorted(folder.glob("*" + PARTIAL)):
        os.rename(staged, staged.with_name(staged.name[: -len(PARTIAL)]))
    (folder / MARKER).unlink()
    _sync(folder)
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        _mark(trash, out, "the previous content of the output, being replaced")
        os.rename(out, trash / "old")
        os.rename(folder, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            os.rename(folder, out)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise MergeError(f"{out}: appeared while the merge was being written") from None
            raise
    _sync(out.parent)


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets while it reads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
