"""Copy checkpoints, read their tensors and rewrite them, the way a faulty merge script would."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a checkpoint folder that a test may damage."""
    shutil.copytree(src, dst)
    return dst


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def rewrite(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply ``edit`` to the tensors of every safetensors file in ``folder`` and save them back.

    Single-file checkpoints only (the tiny merges are); the file keeps its name.
    """
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def write_faulty(merged: Path, out: Path, replace: Mapping[str, torch.Tensor]) -> Path:
    """Copy ``merged`` to ``out`` with some tensors replaced (cast to their stored dtype)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(merged, out)
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(file)
        if not set(tensors) & set(replace):
            continue
        for name in set(tensors) & set(replace):
            tensors[name] = replace[name].to(tensors[name].dtype).contiguous()
        save_file(tensors, file, metadata=metadata)
    return out


def edit_config(folder: Path, **changes: object) -> None:
    """Change keys of ``config.json`` in ``folder``."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))
