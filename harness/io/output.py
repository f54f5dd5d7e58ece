"""Write the harness's own output files atomically, never through a planted symlink.

The lock file, the JSON report, the markdown summary and the plot are written the same way:

1. the bytes go to a new temporary file in the target's own folder, created exclusively
   (``O_CREAT | O_EXCL | O_NOFOLLOW``, a random name: ``tempfile.mkstemp``), so a symlink or a
   file planted under a predictable temporary name is never opened, and two runs updating the
   same file never share a temporary;
2. the file is flushed to disk (``fsync``), so a full disk or a quota fails *here*, with its
   cause, instead of after the rename with a silently truncated file;
3. it is renamed over the target (``rename`` replaces a symlink itself, never its target), and
   the folder is synced. A reader sees the old file or the new one, never half of one.

On any failure the temporary file is removed and :class:`~harness.errors.OutputError` names the
file and the cause. A target that *is* a symlink is refused unless the caller says the user named
that path (then the link's target is replaced, atomically, and the link kept).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from harness.errors import OutputError

#: Default permission bits of a new file, before the umask (what ``open(path, "w")`` uses).
_NEW_FILE_MODE = 0o666


def _umask() -> int:
    """The umask, read without setting it (``os.umask`` would set it, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _target(path: Path, follow_symlink: bool) -> Path:
    """The file to replace: ``path``, or a named symlink's target; refuse a planted symlink."""
    if not path.is_symlink():
        return path
    if not follow_symlink:
        raise OutputError(
            f"{path}: is a symlink (to {os.readlink(path)}); refusing to write through it or"
            " replace it. Remove it, or name the file you mean"
        )
    return path.resolve()


def _mode(target: Path) -> int:
    """Keep the permission bits of the file being replaced; a new file gets the usual ones."""
    try:
        info = target.lstat()
    except FileNotFoundError:
        return _NEW_FILE_MODE & ~_umask()
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise OutputError(f"{target}: is {kind}; refusing to replace it")
    return stat.S_IMODE(info.st_mode)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, follow_symlink: bool = False) -> Path:
    """Replace ``path`` with ``data`` atomically (see the module docs); return the file written.

    ``follow_symlink``: the user named ``path`` themselves, so a symlink there is theirs and its
    target is replaced; otherwise a symlink is refused. Raises :class:`OutputError`.
    """
    target = _target(path, follow_symlink)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mode = _mode(target)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None
    temporary = Path(name)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None
        raise
    _sync_folder(folder)
    return target


def write_text_atomic(path: Path, text: str, *, follow_symlink: bool = False) -> Path:
    r""":func:`write_atomic` for text, as UTF-8.

    A lone surrogate (a non-UTF-8 file name decoded by Python) is written as its ``\udcXX``
    escape instead of failing to encode: inside a JSON string that is the standard escape of
    the same code unit, so JSON written this way is valid and reads back exactly.
    """
    return write_atomic(
        path, text.encode("utf-8", "backslashreplace"), follow_symlink=follow_symlink
    )
