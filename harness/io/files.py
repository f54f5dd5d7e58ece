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


def check_regular_file(path: Path, *, confined: bool = True) -> int:
    """Refuse anything but a regular file inside its own folder; return its size in bytes.

    ``confined=False`` lets a symlink lead anywhere (a file the user named on the command line);
    a pipe, socket, device or folder is still refused.
    """
    try:
        info = path.stat()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL byte in a name
        raise CheckpointError(f"{path!r}: invalid file name: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe, socket or device"
        raise CheckpointError(f"{path}: not a regular file ({kind})")
    if confined and path.is_symlink() and not resolves_inside(path.parent, path):
        raise CheckpointError(
            f"{path}: symlink resolves outside its folder (to {path.resolve()}); refusing to"
            " read it"
        )
    return info.st_size


def check_folder(folder: Path) -> None:
    """Refuse a folder a loader (transformers, peft, tokenizers) must not be handed.

    Libraries open whatever file names they look for without the harness's guards, so before
    one is given ``folder`` every entry of it must be a regular file or a folder, and every
    symlink must stay inside (a Hugging Face cache snapshot's ``blobs`` included): a
    ``tokenizer_config.json`` linked to ``/proc/self/environ`` is never parsed, a pipe never
    blocks a load.
    """
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise CheckpointError(f"{folder}: cannot list: {exc.strerror or exc}") from None
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            continue
        check_regular_file(entry)


def exists(path: Path) -> bool:
    """Whether ``path`` names anything, a dangling symlink included (then it is refused later)."""
    return path.exists() or path.is_symlink()


def read_bounded(path: Path, limit: int, *, what: str = "file", confined: bool = True) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; CheckpointError otherwise.

    The file is refused by :func:`check_regular_file` (a pipe, a device, a symlink out of its
    folder) and by size before a byte is read, and the read itself stops at ``limit + 1`` bytes
    (a file that grows meanwhile, ``/proc`` files whose size reads as 0).
    """
    size = check_regular_file(path, confined=confined)
    if size > limit:
        raise CheckpointError(f"{path}: {size} bytes is too large for a {what} (limit {limit})")
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise CheckpointError(f"{path}: more than {limit} bytes; too large for a {what}")
    return data


def read_json(path: Path, *, limit: int = MAX_JSON_BYTES) -> Any:
    """Load a JSON side file, turning every failure into a one-line CheckpointError."""
    raw = read_bounded(path, limit, what="JSON side file")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: malformed JSON: {one_line(exc)}") from None
