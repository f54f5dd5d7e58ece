"""Guards for every file the harness reads: regular files inside their folder, bounded JSON.

A named pipe or a device would block or never end, and a symlink leaving its folder would read
files the checkpoint has no business naming (``model.safetensors -> ~/.ssh/id_rsa``). Every
reader of user files goes through :func:`check_regular_file` first.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from harness.errors import CheckpointError, one_line

#: JSON side files (config, index) larger than this are refused rather than parsed.
MAX_JSON_BYTES = 64 * 1024 * 1024


def _allowed_area(folder: Path) -> list[Path]:
    """Where files of ``folder`` may live once symlinks are resolved.

    The folder itself and, for a Hugging Face cache snapshot (``.../snapshots/<rev>/``, whose
    files are symlinks into the repository's ``blobs/``), that sibling ``blobs`` folder.
    """
    home = folder.resolve()
    areas = [home]
    if home.parent.name == "snapshots":
        areas.append(home.parent.parent / "blobs")
    return areas


def resolves_inside(folder: Path, candidate: Path) -> bool:
    """Whether ``candidate`` resolves inside ``folder`` (or its HF cache blobs)."""
    target = candidate.resolve()
    for area in _allowed_area(folder):
        try:
            target.relative_to(area)
        except ValueError:
            continue
        return True
    return False


def check_regular_file(path: Path) -> int:
    """Refuse anything but a regular file inside its own folder; return its size in bytes."""
    try:
        info = path.stat()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL byte in a name
        raise CheckpointError(f"{path!r}: invalid file name: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe, socket or device"
        raise CheckpointError(f"{path}: not a regular file ({kind})")
    if path.is_symlink() and not resolves_inside(path.parent, path):
        raise CheckpointError(
            f"{path}: symlink resolves outside its folder (to {path.resolve()}); refusing to"
            " read it"
        )
    return info.st_size


def exists(path: Path) -> bool:
    """Whether ``path`` names anything, a dangling symlink included (then it is refused later)."""
    return path.exists() or path.is_symlink()


def read_json(path: Path, *, limit: int = MAX_JSON_BYTES) -> Any:
    """Load a JSON side file, turning every failure into a one-line CheckpointError."""
    size = check_regular_file(path)
    if size > limit:
        raise CheckpointError(f"{path}: {size} bytes is too large for a JSON side file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: malformed JSON: {one_line(exc)}") from None
