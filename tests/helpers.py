"""Helpers for the harness's own tests: copy checkpoints and rewrite their tensors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a checkpoint folder that a test may damage."""
    shutil.copytree(src, dst)
    return dst


def rewrite(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply ``edit`` to the tensors of every safetensors file in ``folder`` and save them back.

    Single-file checkpoints only (the tiny merges are); the file keeps its name.
    """
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder: Path, **changes: object) -> None:
    """Change keys of ``config.json`` in ``folder``."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes below ``folder`` (tiny fixtures only), to prove nothing changed."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
