"""Prove that inputs stay untouched: snapshots of folders (names, sizes, mtimes, sha256)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: A file's identity: (sha256, size, mtime in ns, mode bits).
Entry = tuple[str, int, int, int]


def snapshot(folder: Path, only: list[Path] | None = None) -> dict[str, Entry]:
    """Every entry below ``folder`` (files, folders, links) -> its content digest and stat.

    ``only`` restricts the snapshot to those files (the committed ones). Links are recorded by
    target, not followed; a folder by its mode and mtime (adding a file changes its mtime).
    """
    out: dict[str, Entry] = {}
    paths = only if only is not None else [folder, *sorted(folder.rglob("*"))]
    for path in paths:
        rel = path.relative_to(folder).as_posix() if path != folder else "."
        if not os.path.lexists(path):
            continue
        info = path.lstat()
        if path.is_symlink():
            digest = "link:" + os.readlink(path)
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest = "dir" if path.is_dir() else "special"
        out[rel] = (digest, info.st_size if path.is_file() else 0, info.st_mtime_ns, info.st_mode)
    return out


def differences(before: dict[str, Entry], after: dict[str, Entry]) -> list[str]:
    """Human-readable differences between two snapshots (empty when identical)."""
    lines = [f"removed {n}" for n in sorted(set(before) - set(after))]
    lines += [f"added {n}" for n in sorted(set(after) - set(before))]
    lines += [
        f"changed {n}: {before[n]} -> {after[n]}"
        for n in sorted(set(before) & set(after))
        if before[n] != after[n]
    ]
    return lines


def committed_files(folder: Path) -> list[Path] | None:
    """The files git tracks below ``folder``, or None outside a git checkout."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--", "."],
            cwd=folder, capture_output=True, check=True, timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [folder / name for name in listing.decode().split("\0") if name]


@dataclass
class InputGuard:
    """Folders whose contents must be identical at the end of the test session."""

    watched: dict[Path, tuple[list[Path] | None, dict[str, Entry]]] = field(default_factory=dict)

    def watch(self, folder: Path, only: list[Path] | None = None) -> None:
        """Record ``folder`` now; :meth:`changes` compares against this.

        A folder watched again (fixtures share the factory's folders) keeps its first record.
        """
        if folder not in self.watched:
            self.watched[folder] = (only, snapshot(folder, only))

    def changes(self) -> list[str]:
        """Every difference since each folder was watched."""
        lines = []
        for folder, (only, before) in self.watched.items():
            lines += [f"{folder}: {d}" for d in differences(before, snapshot(folder, only))]
        return lines


#: The session's guard: session fixtures register what they build, the conftest checks it.
GUARD = InputGuard()


def install_family(
    monkeypatch: Any, runs: dict[str, Callable[[Any], Any]], family: str = "security"
) -> None:
    """Put test-only checks in place of one family's (``merge::<family>::<name>``), in-process.

    Each function of ``runs`` is a check's ``run(ctx)``: a real :class:`~harness.run.check.Check`
    run by the real runner and items, for behaviour no real input provokes on demand (a hang, an
    internal error, a KeyboardInterrupt). Select them with ``--merge-checks <family>``.
    """
    import sys
    import types

    from harness.checks import FAMILIES
    from harness.run.check import Check
    from harness.run.result import Family

    chosen = Family(family)
    module = types.ModuleType(f"merge_harness_test_{family}")
    module.checks = lambda settings: [  # type: ignore[attr-defined]
        Check(chosen, name, f"test-only {name}", run) for name, run in runs.items()
    ]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(FAMILIES, chosen, module.__name__)


class NetworkGuard:
    """Refuses and records every attempt to reach the network (TCP/UDP connects, DNS lookups).

    Installed with a monkeypatch around an in-process run: nothing the harness or the libraries
    it drives (transformers, peft, datasets, lm-eval, huggingface_hub) does can leave the
    machine unnoticed, because every such path goes through these socket functions.
    """

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def install(self, monkeypatch: Any) -> None:
        """Patch the socket module (undone with the monkeypatch)."""
        import socket

        real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
        inet = (socket.AF_INET, socket.AF_INET6)

        def refuse(what: str) -> OSError:
            self.attempts.append(what)
            return OSError(f"network access refused by the test guard: {what}")

        def connect(sock: socket.socket, address: Any) -> None:
            if sock.family in inet:
                raise refuse(f"connect {address!r}")
            real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            if sock.family in inet:
                raise refuse(f"connect_ex {address!r}")
            return real_connect_ex(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            raise refuse(f"getaddrinfo {host!r}")

        def create_connection(address: Any, *args: Any, **kwargs: Any) -> Any:
            raise refuse(f"create_connection {address!r}")

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", create_connection)
